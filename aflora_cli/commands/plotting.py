"""`aflora inspect CKPT --plot FILE`: one figure of a run, from its checkpoint (and its metrics.jsonl if beside it).

Two halves, so the numbers can be tested without looking at pixels: `figure_data` turns the `inspect` report,
the weight shapes and the run's log records into plain data (lists and dicts), and `draw` renders that data
with matplotlib. matplotlib is an optional extra and is imported only when a figure is drawn, so `aflora
--help` and `aflora inspect` without `--plot` never load it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aflora_cli.commands.inspection import weight_shapes
from aflora_cli.engine.manifest import MATRICES
from aflora_cli.engine.schedule import frozen_target
from aflora_cli.errors import AfloraError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FORMATS = {".png": "png", ".svg": "svg"}
METRICS_FILE = "metrics.jsonl"  # what the trainer writes beside `last` and `best` (trainer.METRICS_FILE)
DEFAULT_POWER = 3.0  # the paper's cubic schedule; recipes may set `freezing.power`
INSTALL_HINT = "--plot needs matplotlib: pip install 'aflora[plot]'"


# ------------------------------------------------------------------------------------------- output checks


def check_output(path: Path) -> str:
    """The image format for `path`, or an AfloraError — called before anything is drawn or printed.

    Refuses what savefig would only discover after the work is done: an unsupported extension, a directory
    that is missing or not writable, a path that is a directory; and a missing matplotlib.
    """
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise AfloraError(f"{path}: --plot writes .png or .svg files, not {path.suffix or 'files without one'}")
    folder = path.parent
    if not folder.is_dir():
        raise AfloraError(f"{path}: directory {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise AfloraError(f"{path}: directory {folder} is not writable")
    if path.is_dir():
        raise AfloraError(f"{path}: is a directory")
    _require_matplotlib()
    return fmt


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise AfloraError(INSTALL_HINT) from None


# ------------------------------------------------------------------------------------------------- inputs


def metrics_file(checkpoint: str | Path) -> Path | None:
    """The run's metrics.jsonl when the checkpoint directory sits in its run directory, else None."""
    candidate = Path(checkpoint).resolve().parent / METRICS_FILE
    return candidate if candidate.is_file() else None


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file; a damaged line is one clear error, not a traceback."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise AfloraError(f"{path}: cannot be read ({err})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise AfloraError(f"{path}: line {number} is not JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise AfloraError(f"{path}: line {number} is not a step record")
        records.append(record)
    return records


def lora_params(shapes: dict[str, tuple[int, ...]], modules: list[str], rank: int) -> int:
    """What a LoRA of rank `rank` on the same modules trains: the sum of r·(in + out), head excluded.

    `in` and `out` come from the checkpoint's own tensors (`lora_A` is r×in, `lora_B` is out×r), so no
    base model is needed.
    """
    total = 0
    for module in modules:
        a, b = shapes.get(f"{module}.lora_A"), shapes.get(f"{module}.lora_B")
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            raise AfloraError(f"weights of {module} are missing or not matrices (lora_A {a}, lora_B {b})")
        total += rank * (a[1] + b[0])
    return total


# --------------------------------------------------------------------------------------------- schedule


def planned_frozen(step: int, total_steps: int, t_i: int, t_f: int, units: int, power: float = DEFAULT_POWER) -> int:
    """⌊r(t)·N⌋: how many of `units` the schedule has frozen at 0-based step `step` — the engine's own
    `frozen_target`, so the plan drawn is the one the run followed."""
    return frozen_target(step, total_steps, t_i, t_f, units, power)


def _change_points(values: list[int], key: str) -> list[dict[str, int]]:
    """A per-step series as the steps where it changes (the first step always), like `by_step`."""
    points: list[dict[str, int]] = []
    for step, value in enumerate(values):
        if not points or points[-1][key] != value:
            points.append({"step": step, key: value})
    return points


def _power(report: dict[str, Any]) -> float:
    power = report["freezing"].get("power", DEFAULT_POWER)
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not power > 0:
        raise AfloraError(f"{report['checkpoint']}: entry 'freezing.power' is damaged ({power!r})")
    return float(power)


# ------------------------------------------------------------------------------------------------- data


def figure_data(
    report: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    records: list[dict[str, Any]] | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Everything the figure shows, as plain data: `report` from `inspect_checkpoint`, `shapes` from the
    weights file, `records` from the run's metrics.jsonl (None: no log, so no training panel; `source`
    names the file).

    Step series are change points `{"step": t, <value>: v}` (v holds from t until the next point), drawn up
    to `end` = the checkpoint's step, on an axis to `total_steps`.
    """
    matrices = report["matrices"]
    end = report["step"]
    total = report["total_steps"]
    return {
        "checkpoint": report["checkpoint"],
        "method": report["method"],
        "rank": report["rank"],
        "task": report["task"]["name"],
        "step": end,
        "total_steps": total,
        "t_i": report["t_i"],
        "t_f": report["t_f"],
        "grid": _grid(report),
        "schedule": _schedule(report, matrices),
        "trainable": {
            "by_step": [
                {"step": p["step"], "trainable": p["trainable"]} for p in report["trainable_params"]["by_step"]
            ],
            "end": end,
            "average": report["trainable_params"]["average"],
            "lora": _lora(report, shapes),
        },
        "training": None if records is None else _training(report, records, source),
    }


def _lora(report: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> int:
    modules = list(dict.fromkeys(row["name"].rpartition(".")[0] for row in report["matrices"]))
    try:
        return lora_params(shapes, modules, report["rank"])
    except AfloraError as err:
        raise AfloraError(f"{report['checkpoint']}: {err}") from None


def _grid(report: dict[str, Any]) -> dict[str, Any]:
    """Fig. 5 over every target: rows = PM kinds (module + A/B, in model order), columns = layers.

    A cell is None where a layer has no such PM, else its name, policy and the step it froze (policy
    `frozen`: 0, it never trained; policy `trainable` or an adaptive PM still training: None).
    """
    modules = list(dict.fromkeys(group["module"] for group in report["targets"]))
    kinds = [f"{module} {matrix[-1]}" for module in modules for matrix in MATRICES]
    rows = {(row["layer"], f"{row['module']} {row['matrix']}"): row for row in report["matrices"]}
    found = {layer for layer, _ in rows}
    layers = sorted(layer for layer in found if layer is not None) + ([None] if None in found else [])
    return {
        "kinds": kinds,
        "layers": layers,
        "cells": [
            [
                None
                if (layer, kind) not in rows
                else {
                    "name": rows[(layer, kind)]["name"],
                    "policy": rows[(layer, kind)]["policy"],
                    "frozen_at_step": rows[(layer, kind)]["frozen_at_step"],
                }
                for layer in layers
            ]
            for kind in kinds
        ],
    }


def _schedule(report: dict[str, Any], matrices: list[dict[str, Any]]) -> dict[str, Any]:
    """Eq. 5 planned vs the freeze log, in adaptive PMs (a unit is one PM, or A and B with `together`)."""
    adaptive = [row for row in matrices if row["policy"] == "adaptive"]
    per_unit = 2 if report["freezing"].get("granularity") == "together" else 1
    units = len(adaptive) // per_unit
    power = _power(report)
    total, t_i, t_f = report["total_steps"], report["t_i"], report["t_f"]
    planned = [per_unit * planned_frozen(t, total, t_i, t_f, units, power) for t in range(max(total, 1))]
    froze = sorted(row["frozen_at_step"] for row in adaptive if row["frozen_at_step"] is not None)
    actual, i = [], 0
    for t in range(max(report["step"], 1)):
        while i < len(froze) and froze[i] <= t:
            i += 1
        actual.append(i)
    return {
        "adaptive_pms": len(adaptive),
        "units": units,
        "pms_per_unit": per_unit,
        "power": power,
        "planned": _change_points(planned, "frozen"),
        "actual": _change_points(actual, "frozen"),
    }


def _training(report: dict[str, Any], records: list[dict[str, Any]], source: str | None) -> dict[str, Any]:
    """Training loss from the step records and the main metric on the first eval split from the eval records."""
    split = report["task"]["eval_splits"][0] if report["task"]["eval_splits"] else None
    name = report["task"]["main_metric"]
    loss, metric = [], []
    for record in records:
        if "eval" in record:
            values = record["eval"].get(split) if isinstance(record["eval"], dict) else None
            value = values.get(name) if isinstance(values, dict) else None
            if isinstance(value, (int, float)):
                metric.append({"step": record["step"], "value": value})
        elif "event" not in record and isinstance(record.get("loss"), (int, float)):
            loss.append({"step": record["step"], "loss": record["loss"]})
    return {"source": source, "loss": loss, "metric": {"name": name, "split": split, "points": metric}}


def checkpoint_figure_data(report: dict[str, Any]) -> dict[str, Any]:
    """`figure_data` for the checkpoint the report describes, with its run's log when it sits beside it."""
    checkpoint = Path(report["checkpoint"])
    log = metrics_file(checkpoint)
    records = None if log is None else read_records(log)
    return figure_data(report, weight_shapes(checkpoint), records, None if log is None else str(log))


# ---------------------------------------------------------------------------------------------- drawing

_CMAP = "viridis_r"  # early freezing light, late freezing dark, like the paper's Fig. 5
_SPECIAL = {  # cells that have no freezing step, told apart by fill and hatch
    "frozen": {"facecolor": "#d9d9d9", "hatch": "xx", "label": "frozen at init (policy frozen)"},
    "never": {"facecolor": "#ffffff", "hatch": "//", "label": "adaptive, not frozen by step {step}"},
    "trainable": {"facecolor": "#fde0c5", "hatch": "..", "label": "always trainable (policy trainable)"},
}


def _cell_state(cell: dict[str, Any]) -> str:
    if cell["policy"] == "frozen":
        return "frozen"
    if cell["policy"] == "trainable":
        return "trainable"
    return "froze" if cell["frozen_at_step"] is not None else "never"


def draw(data: dict[str, Any], path: Path) -> Path:
    """Draw `figure_data` output and save it to `path` (.png or .svg), atomically: a temporary file in the
    same directory is renamed into place, so a failure leaves no half-written image."""
    fmt = check_output(path)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    has_training = data["training"] is not None
    fig = Figure(figsize=(15, 10.5), layout="constrained")
    FigureCanvasAgg(fig)  # Agg, without touching pyplot or the process-wide backend (no display needed)
    grid = fig.add_gridspec(2, 3, height_ratios=(1.25, 1), width_ratios=(1.15, 1, 1))
    _draw_grid(fig, fig.add_subplot(grid[0, :2]), data)
    _draw_schedule(fig.add_subplot(grid[0, 2]), data)
    if has_training:
        _draw_trainable(fig.add_subplot(grid[1, 0]), data)
        _draw_loss(fig.add_subplot(grid[1, 1]), data)
        _draw_metric(fig.add_subplot(grid[1, 2]), data)
    else:
        _draw_trainable(fig.add_subplot(grid[1, :]), data)
    fig.suptitle(
        f"{data['checkpoint']}: {data['method']}, rank {data['rank']}, task {data['task']}, "
        f"step {data['step']} of {data['total_steps']}"
        + ("" if has_training else " (no metrics.jsonl beside the checkpoint: no training curves)"),
        fontsize=13,
    )
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            fig.savefig(stream, format=fmt, dpi=110)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it private; give it a new file's usual mode
        os.replace(temporary, path)
    except BaseException as err:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(err, OSError):  # a full disk, say: one line like any other output that cannot be written
            raise AfloraError(f"{path}: could not be written ({err})") from None
        raise
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plot_checkpoint(report: dict[str, Any], path: Path) -> Path:
    """The whole `--plot`: data for the report's checkpoint, drawn and saved to `path`."""
    return draw(checkpoint_figure_data(report), path)


def _thousands(value: float, _position: Any = None) -> str:
    return f"{value:,.0f}"


def _checkpoint_line(ax: Axes, data: dict[str, Any]) -> None:
    """Step axes run to T with whole-number ticks; when the checkpoint was saved earlier, mark where its
    knowledge ends."""
    from matplotlib.ticker import MaxNLocator

    total = max(data["total_steps"], 1)
    ax.set_xlim(-0.02 * total, 1.02 * total)  # room for markers at 0 and at T
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    if data["step"] < data["total_steps"]:
        ax.axvline(
            data["step"], color="#555555", linestyle=":", linewidth=1.2, label=f"checkpoint (step {data['step']})"
        )


def _draw_grid(fig: Figure, ax: Axes, data: dict[str, Any]) -> None:
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Patch, Rectangle
    from matplotlib.ticker import MaxNLocator

    grid = data["grid"]
    kinds, layers = grid["kinds"], grid["layers"]
    norm = Normalize(0, max(data["total_steps"], 1))
    cmap = colormaps[_CMAP]
    annotate = len(layers) <= 16
    seen: set[str] = set()
    for y, row in enumerate(grid["cells"]):
        for x, cell in enumerate(row):
            if cell is None:
                continue
            state = _cell_state(cell)
            seen.add(state)
            if state == "froze":
                step = cell["frozen_at_step"]
                color = cmap(norm(step))
                ax.add_patch(Rectangle((x, y), 1, 1, facecolor=color, edgecolor="white", linewidth=1.5))
                if annotate:
                    light = sum(color[:3]) / 3 > 0.55
                    ax.text(
                        x + 0.5,
                        y + 0.5,
                        str(step),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="black" if light else "white",
                    )
            else:
                style = _SPECIAL[state]
                ax.add_patch(
                    Rectangle(
                        (x, y),
                        1,
                        1,
                        facecolor=style["facecolor"],
                        hatch=style["hatch"],
                        edgecolor="#8c8c8c",
                        linewidth=0.8,
                    )
                )
    ax.set_xlim(0, max(len(layers), 1))
    ax.set_ylim(max(len(kinds), 1), 0)
    ax.set_xticks([x + 0.5 for x in range(len(layers))], ["—" if layer is None else str(layer) for layer in layers])
    ax.set_yticks([y + 0.5 for y in range(len(kinds))], kinds)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_xlabel("layer")
    ax.set_title("Step each projection matrix (PM) froze, per layer (Fig. 5)", loc="left")
    if "froze" in seen:
        colorbar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.01, fraction=0.04)
        colorbar.set_label("froze at step")
        colorbar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    handles = [
        Patch(
            facecolor=_SPECIAL[state]["facecolor"],
            hatch=_SPECIAL[state]["hatch"],
            edgecolor="#8c8c8c",
            label=_SPECIAL[state]["label"].format(step=data["step"]),
        )
        for state in _SPECIAL
        if state in seen
    ]
    if handles:
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=len(handles), frameon=False)


def _steps_xy(points: list[dict[str, Any]], key: str, end: int) -> tuple[list[int], list[float]]:
    """Change points as the corners of a step line that holds its last value until `end`."""
    xs = [p["step"] for p in points]
    ys = [p[key] for p in points]
    if points and end > xs[-1]:
        xs.append(end)
        ys.append(ys[-1])
    return xs, ys


def _draw_schedule(ax: Axes, data: dict[str, Any]) -> None:
    schedule = data["schedule"]
    total, t_i, t_f = data["total_steps"], data["t_i"], data["t_f"]
    _checkpoint_line(ax, data)
    ax.set_title("Eq. 5 schedule: frozen adaptive PMs", loc="left")
    ax.set_xlabel("step")
    ax.set_ylabel("frozen adaptive PMs")
    if not schedule["adaptive_pms"]:
        ax.text(
            0.5, 0.5, f"no adaptive PMs\n(method {data['method']})", ha="center", va="center", transform=ax.transAxes
        )
        ax.set_yticks([])
        return
    xs, ys = _steps_xy(schedule["planned"], "frozen", total)
    power = f"{schedule['power']:g}"
    planned = f"planned ⌊r(t)·N⌋, power {power}, N = {schedule['units']}"
    ax.step(xs, ys, where="post", color="#9ecae1", linewidth=5, solid_capstyle="butt", label=planned)
    xs, ys = _steps_xy(schedule["actual"], "frozen", data["step"])
    ax.step(xs, ys, where="post", color="#d62728", linewidth=1.5, label="actual (freeze log)")
    ax.axvspan(0, t_i, color="#eeeeee", zorder=0, label=f"before t_i = {t_i}, after T − t_f = {total - t_f}")
    ax.axvspan(total - t_f, total, color="#eeeeee", zorder=0)
    ax.set_ylim(0, schedule["adaptive_pms"] * 1.05)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=9, frameon=False)  # off the curve


def _draw_trainable(ax: Axes, data: dict[str, Any]) -> None:
    from matplotlib.ticker import FuncFormatter

    trainable = data["trainable"]
    _checkpoint_line(ax, data)
    xs, ys = _steps_xy(trainable["by_step"], "trainable", trainable["end"])
    ax.step(xs, ys, where="post", color="#2ca02c", linewidth=2, label="trainable")
    ax.axhline(
        trainable["average"],
        color="#2ca02c",
        linestyle="--",
        linewidth=1.2,
        label=f"average {trainable['average']:,.0f} (#Params)",
    )
    ax.axhline(
        trainable["lora"],
        color="#9467bd",
        linestyle="-.",
        linewidth=1.2,
        label=f"LoRA r={data['rank']}, same targets: {trainable['lora']:,}",
    )
    ax.set_ylim(0, max([trainable["lora"], *ys]) * 1.45)  # headroom: the legend sits above the lines
    ax.yaxis.set_major_formatter(FuncFormatter(_thousands))
    ax.set_title("Trainable parameters (head excluded)", loc="left")
    ax.set_xlabel("step")
    ax.set_ylabel("parameters")
    ax.legend(loc="upper right", fontsize=9)


def _draw_loss(ax: Axes, data: dict[str, Any]) -> None:
    points = data["training"]["loss"]
    _checkpoint_line(ax, data)
    ax.plot(
        [p["step"] for p in points],
        [p["loss"] for p in points],
        color="#ff7f0e",
        marker="." if len(points) < 60 else None,
    )
    ax.set_title("Training loss", loc="left")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if not points:
        ax.text(0.5, 0.5, "no step records in metrics.jsonl", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])


def _draw_metric(ax: Axes, data: dict[str, Any]) -> None:
    metric = data["training"]["metric"]
    points = metric["points"]
    _checkpoint_line(ax, data)
    ax.plot([p["step"] for p in points], [p["value"] for p in points], color="#1f77b4", marker="o")
    ax.set_title(f"{metric['name']} on {metric['split']}", loc="left")
    ax.set_xlabel("step")
    ax.set_ylabel(metric["name"])
    if not points:
        ax.text(0.5, 0.5, "no evaluations in metrics.jsonl", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
