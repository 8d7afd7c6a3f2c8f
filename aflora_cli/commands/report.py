"""Rich rendering of `aflora eval` results and `aflora inspect` reports (the data comes from scoring/inspection)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich import box
from rich.color import Color
from rich.console import Console, Group
from rich.style import Style
from rich.table import Table
from rich.text import Text

from aflora_cli.engine.config import QuantizationConfig

if TYPE_CHECKING:
    from aflora_cli.commands.scoring import EvalResult

_LIGHT = (222, 235, 247)  # the ends of a blue scale, like the paper's Fig. 5
_DARK = (8, 48, 107)
CURVE_ROWS = 12
BAR_WIDTH = 36


# ------------------------------------------------------------------------------------------------------ eval


def render_eval(console: Console, result: EvalResult) -> None:
    """The metrics as a table, with what training logged for the same checkpoint and split beside them."""
    source = f"file {result.data_file}" if result.data_file else f"split {result.split}"
    heading = f"{result.checkpoint}: task {result.task}, {source} ({result.rows:,} rows)"
    console.print(heading, highlight=False, markup=False)
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    if result.logged is not None:
        table.add_column(f"logged in training (step {result.step})", justify="right")
    for name, value in result.metrics.items():
        style = "bold" if name == result.main_metric else ""
        row = [Text(name, style=style), Text(f"{value:.4f}", style=style)]
        if result.logged is not None:
            logged = result.logged.get(name)
            row.append(Text("—" if logged is None else f"{logged:.4f}"))
        table.add_row(*row)
    console.print(table)
    console.print(f"device: {result.device}", style="dim", highlight=False)


# --------------------------------------------------------------------------------------------------- inspect


def render_inspect(console: Console, report: dict[str, Any]) -> None:
    """Summary, freeze timeline, trainable-parameter curve and per-layer heat map."""
    console.print(summary_table(report))
    console.print(timeline_table(report))
    if report.get("freezing_note"):
        console.print(report["freezing_note"], highlight=False, markup=False)
    for line in fixed_policy_lines(report):
        console.print(line, highlight=False, markup=False)
    console.print(curve_table(report))
    if report["heatmap"]["columns"]:
        console.print(heatmap_table(report))
        console.print(heatmap_legend(report), highlight=False)


def _count(n: float) -> str:
    return f"{n:,.0f}" if float(n).is_integer() else f"{n:,.1f}"


def _storage_text(base: dict[str, Any]) -> str:
    """The base's storage as the manifest records it (checkpoints older than it: fp32), 4-bit defaults filled in
    as they were used (older checkpoints recorded unset keys as null)."""
    if not base.get("quantization"):
        return base.get("dtype", "fp32")
    quant = QuantizationConfig.model_validate(base["quantization"])
    if quant.bits == 8:
        return f"8-bit linear layers, the rest {base.get('dtype', 'fp32')}"
    double = ", double quantization" if quant.double_quant else ""
    rest = base.get("dtype", "fp32")
    return f"4-bit {quant.type} linear layers ({quant.compute_dtype} compute{double}), the rest {rest}"


def summary_table(report: dict[str, Any]) -> Table:
    table = Table(
        title=Text(f"checkpoint {report['checkpoint']}"), title_justify="left", show_header=False, box=box.SIMPLE
    )
    table.add_column(style="bold")
    table.add_column()
    base = report["base_model"]
    revision = f" @ {base['revision']}" if base.get("revision") else ""
    table.add_row("base model", Text(f"{base['name_or_path']}{revision} ({base['fingerprint'][:19]}…)"))
    table.add_row("base stored as", _storage_text(base))
    task = report["task"]
    if task["family"] == "classification":
        labels = f", labels {', '.join(task['label_names'])}" if task.get("label_names") else ""
        table.add_row("task", Text(f"{task['name']} ({task.get('problem')}{labels})"))
    else:
        what = f"{task['family']}, {task.get('format')} rows, main metric {task['main_metric']}"
        table.add_row("task", Text(f"{task['name']} ({what})"))
    table.add_row("method", f"{report['method']}, rank {report['rank']}, scaling {report['scaling']:g}")
    targets = Group(
        *(
            Text(f"{group['module']} ({group['kind']}, {group['policy']}) in {layer_span(group['layers'])}")
            for group in report["targets"]
        )
    )
    table.add_row("targets", targets)
    table.add_row("head", Text(", ".join(report["head"]) or "none (no new parameters beside the adapters)"))
    table.add_row(
        "steps",
        f"{report['step']} of {report['total_steps']} (epoch {report['epoch']:.2f}, {report['steps_per_epoch']} "
        f"steps per epoch); t_i = {report['t_i']}, t_f = {report['t_f']}",
    )
    metric = report["final_metric"]
    table.add_row(
        "metric",
        "not evaluated at this checkpoint"
        if metric is None
        else f"{metric['name']} {metric['value']:.4f} on {metric['split']}",
    )
    params = report["trainable_params"]
    line = (
        f"start {_count(params.get('start', 0))}, end {_count(params.get('end', 0))}, "
        f"average {_count(params['average'])} (#Params, head excluded)"
    )
    if "average_with_head" in params:
        line += f"; with the head: average {_count(params['average_with_head'])}"
    table.add_row("trainable", line)
    return table


def layer_span(layers: list[int | None]) -> str:
    numbers = [layer for layer in layers if layer is not None]
    if not numbers:
        return "1 module"
    if numbers == list(range(numbers[0], numbers[-1] + 1)) and len(numbers) > 2:
        return f"layers {numbers[0]}–{numbers[-1]}"
    return "layers " + ", ".join(map(str, numbers))


def timeline_table(report: dict[str, Any]) -> Table:
    """The adaptive PMs in the order they froze."""
    table = Table(title="freeze timeline (adaptive PMs, in the order they froze)", title_justify="left")
    for column, justify in (
        ("#", "right"),
        ("layer", "right"),
        ("PM", "left"),
        ("kind", "left"),
        ("froze at step", "right"),
        ("epoch", "right"),
        ("score then", "right"),
    ):
        table.add_column(column, justify=justify, no_wrap=column == "PM")  # type: ignore[arg-type]
    adaptive = [row for row in report["matrices"] if row["policy"] == "adaptive"]
    for i, row in enumerate(adaptive, start=1):
        step = row["frozen_at_step"]
        table.add_row(
            str(i),
            "—" if row["layer"] is None else str(row["layer"]),
            f"{row['module']} {row['matrix']}",
            row["kind"],
            "never" if step is None else str(step),
            "—" if step is None else f"{row['frozen_at_epoch']:.2f}",
            "—" if row["score"] is None else f"{row['score']:.3e}",
        )
    if not adaptive:
        table.add_row("", "", "no adaptive PMs in this checkpoint", "", "", "", "")
    return table


def fixed_policy_lines(report: dict[str, Any]) -> list[str]:
    """One line per kind whose PMs do not freeze adaptively."""
    groups: dict[tuple[str, str], int] = {}
    for row in report["matrices"]:
        if row["policy"] != "adaptive":
            groups[(row["kind"], row["policy"])] = groups.get((row["kind"], row["policy"]), 0) + 1
    meaning = {"frozen": "frozen at their initial values for the whole run", "trainable": "trainable the whole run"}
    return [
        f"{kind} PMs ({count}): {meaning.get(policy, policy)} (policy {policy})"
        for (kind, policy), count in groups.items()
    ]


def curve_points(by_step: list[dict[str, Any]], end: int, rows: int = CURVE_ROWS) -> list[dict[str, Any]]:
    """The count at each change point, or at `rows` evenly spaced steps when there are more changes."""
    if len(by_step) <= rows:
        points = list(by_step)
        if end > points[-1]["step"]:
            points.append({**points[-1], "step": end})
        return points
    steps = sorted({round(k * end / (rows - 1)) for k in range(rows)})
    points, i = [], 0
    for step in steps:
        while i + 1 < len(by_step) and by_step[i + 1]["step"] <= step:
            i += 1
        points.append({**by_step[i], "step": step})
    return points


def curve_table(report: dict[str, Any]) -> Table:
    """Trainable parameters (head excluded) over training, as bar rows."""
    params = report["trainable_params"]
    points = curve_points(params["by_step"], report["step"])
    top = max((point["trainable"] for point in points), default=0) or 1
    per_epoch = max(report["steps_per_epoch"], 1)
    table = Table(title="trainable parameters over training (head excluded)", title_justify="left", box=box.SIMPLE)
    table.add_column("step", justify="right")
    table.add_column("epoch", justify="right")
    table.add_column("trainable", justify="right")
    table.add_column("")
    for point in points:
        bar = "█" * max(round(point["trainable"] / top * BAR_WIDTH), 1 if point["trainable"] else 0)
        table.add_row(
            str(point["step"]), f"{point['step'] / per_epoch:.2f}", f"{point['trainable']:,}", Text(bar, style="cyan")
        )
    return table


def shade(fraction: float) -> Style:
    """A cell style on the blue scale: light for few steps before freezing, dark for many."""
    fraction = min(max(fraction, 0.0), 1.0)
    rgb = tuple(round(a + (b - a) * fraction) for a, b in zip(_LIGHT, _DARK, strict=True))
    return Style(bgcolor=Color.from_rgb(*rgb), color="white" if fraction > 0.5 else "black")


def heatmap_table(report: dict[str, Any]) -> Table:
    """Rows = layers, columns = module x A/B; shade = steps trained before freezing (as the paper's Fig. 5)."""
    heat = report["heatmap"]
    end = max(report["step"], 1)
    table = Table(title="steps before freezing, per layer", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("layer", justify="right")
    for column in heat["columns"]:  # "intermediate.dense A" -> a header of two lines: "intermediate" / "dense A"
        head, _, tail = column.rpartition(".")
        table.add_column(f"{head}\n{tail}" if head else column, justify="center", no_wrap=True)
    for layer, values, present in zip(heat["layers"], heat["frozen_at_step"], heat["present"], strict=True):
        cells: list[Text] = []
        for value, here in zip(values, present, strict=True):
            if not here:
                cells.append(Text(""))
            elif value is None:
                cells.append(Text(" never ", style=shade(1.0)))
            else:
                cells.append(Text(f" {value:>5} ", style=shade(value / end)))
        table.add_row("—" if layer is None else str(layer), *cells)
    return table


def heatmap_legend(report: dict[str, Any]) -> Text:
    legend = Text("shade: ")
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        legend.append(f" {round(fraction * report['step'])} ", style=shade(fraction))
    legend.append(f"  steps before freezing; 'never' = still trainable at step {report['step']}")
    return legend
