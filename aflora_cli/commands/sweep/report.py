"""A sweep's report from its results alone: the learning-rate grids on the selection split, per setting the metric
on the reported split (mean ± std over seeds) against its trainable parameters, paired differences against the
baseline with a 95 % interval and a plain verdict; the same as markdown, as a terminal table and as a picture."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aflora_cli.commands.sweep.plan import Choice, Progress
from aflora_cli.commands.sweep.spec import Sweep
from aflora_cli.commands.sweep.stats import Paired, mean_std, paired
from aflora_cli.errors import AfloraError

Table = tuple[list[str], list[list[str]]]  # headers, rows


@dataclass
class Summary:
    """One setting: its grid, its chosen rate and its seeds there."""

    name: str
    grid: list[float | None]  # the rates the choice is made among (so far)
    scores: dict[float | None, float]  # the first seed's selection score by rate: the grid's and any other run
    chosen: Choice | None  # None until the grid is complete
    seeds: dict[int, dict[str, Any]] = field(default_factory=dict)
    expected_seeds: int = 0

    @property
    def complete(self) -> bool:
        return self.chosen is not None and len(self.seeds) == self.expected_seeds

    def values(self, split: str, metric: str) -> dict[int, float]:
        return {seed: float(r["metrics"][split][metric]) for seed, r in sorted(self.seeds.items())}

    def trainable(self, key: str) -> float | None:
        counted = [r[key] for r in self.seeds.values()]
        return statistics.mean(counted) if counted else None

    @property
    def status(self) -> str:
        if self.complete:
            return "complete"
        if self.chosen is not None:
            return f"seeds {len(self.seeds)} of {self.expected_seeds}"
        done = sum(lr in self.scores for lr in self.grid)
        return f"grid {done} of {len(self.grid)}" if done else "not run"


def summarize(sweep: Sweep, progress: Progress) -> list[Summary]:
    spec = sweep.spec
    for run, record in progress.by_run.items():
        if spec.selection.metric not in record["metrics"].get(spec.reported_split, {}):
            have = {split: sorted(values) for split, values in record["metrics"].items()}
            raise AfloraError(
                f"{sweep.path}: reported_split: run {run.describe()} has no {spec.selection.metric!r} on split "
                f"{spec.reported_split!r}; it has {have}"
            )
    rows = []
    for name in spec.settings:
        ran = [run for run in progress.by_run if run.setting == name and run.seed == spec.seeds[0]]
        scores = {run.lr: score for run in ran if (score := progress.score(run)) is not None}
        rows.append(
            Summary(name, progress.grid(name), scores, progress.chosen(name), progress.seeds(name), len(spec.seeds))
        )
    return rows


def versus(setting: Summary, baseline: Summary, split: str, metric: str, goal: str) -> Paired | None:
    """Paired differences setting - baseline over their common seeds (sign flipped when lower is better, so that
    a positive difference is always the setting doing better); None without a common seed."""
    mine, theirs = setting.values(split, metric), baseline.values(split, metric)
    common = sorted(set(mine) & set(theirs))
    if not common:
        return None
    sign = 1.0 if goal == "max" else -1.0
    return paired([sign * (mine[s] - theirs[s]) for s in common])


def _cell(values: list[float]) -> str:
    if not values:
        return "—"
    mean, std = mean_std(values)
    return f"{mean:.4f}" if len(values) == 1 else f"{mean:.4f} ± {std:.4f}"


def _count(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def _rate(choice: Choice | None) -> str:
    if choice is None:
        return "—"
    return "recipe's" if choice.lr is None else f"{choice.lr:g}"


def grid_table(sweep: Sweep, rows: list[Summary]) -> Table:
    rates = sorted({lr for row in rows for lr in [*row.grid, *row.scores] if lr is not None})
    headers = ["setting", *(f"lr {lr:g}" for lr in rates), "chosen"]
    body = []
    for row in rows:
        cells = [f"{row.scores[lr]:.4f}" if lr in row.scores else "—" for lr in rates]
        body.append([row.name, *cells, _rate(row.chosen)])
    return headers, body


def front_table(sweep: Sweep, rows: list[Summary]) -> Table:
    spec = sweep.spec
    metric, split, chosen_on = spec.selection.metric, spec.reported_split, spec.selection.split
    base = next((row for row in rows if row.name == spec.baseline), None)
    headers = ["setting", "lr", "seeds", f"{split} {metric}", f"{chosen_on} {metric}", "avg trainable"]
    headers += ["final trainable"]
    if base is not None:
        headers += [f"vs {base.name}: paired difference (95 % interval)", "verdict"]
    headers += ["status"]
    body = []
    for row in sorted(
        rows, key=lambda r: (r.trainable("trainable_average") is None, r.trainable("trainable_average") or 0)
    ):
        cells = [row.name, _rate(row.chosen), str(len(row.seeds))]
        cells += [_cell(list(row.values(split, metric).values())), _cell(list(row.values(chosen_on, metric).values()))]
        cells += [_count(row.trainable("trainable_average")), _count(row.trainable("trainable_end"))]
        if base is not None:
            cells += _comparison(row, base, split, metric, spec.selection.goal)
        body.append([*cells, row.status])
    return headers, body


def _by_count(row: Summary) -> tuple[bool, float]:
    """Fewest average trainable parameters first; settings without a run at their chosen rate last."""
    count = row.trainable("trainable_average")
    return count is None, count or 0.0


def _comparison(row: Summary, base: Summary, split: str, metric: str, goal: str) -> list[str]:
    if row is base:
        return ["baseline", ""]
    if not (row.complete and base.complete):
        return ["—", "not judged: seeds missing"]
    test = versus(row, base, split, metric, goal)
    if test is None:
        return ["—", "not judged: no common seed"]
    half = "" if math.isnan(test.half_width) else f" ± {test.half_width:.4f}"
    return [f"{test.mean:+.4f}{half}", test.verdict]


def markdown(headers: list[str], body: list[list[str]]) -> str:
    numeric = [all(_numeric(row[i]) for row in body) and i > 0 for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def _numeric(cell: str) -> bool:
    return cell == "—" or cell[:1].isdigit() or (cell[:1] != "" and cell[:1] in "+-")


def report_markdown(sweep: Sweep, rows: list[Summary]) -> str:
    spec = sweep.spec
    selection = spec.selection
    seeds = ", ".join(map(str, spec.seeds))
    lines = [
        f"### Sweep `{sweep.path.name}`: {selection.metric} on {spec.reported_split} against trainable parameters",
        "",
    ]
    if spec.lr is not None:
        ladder = ", ".join(f"{lr:g}" for lr in spec.lr.ladder)
        lines += [
            f"Each setting's learning rate is chosen on {selection.split} {selection.metric} with seed "
            f"{spec.seeds[0]}, "
            f"starting from {', '.join(f'{lr:g}' for lr in spec.lr.first)} and growing one step of the ladder "
            f"({ladder}) past an edge while the best value sits there; seeds {seeds} run at the chosen rate.",
            "",
            f"#### Learning-rate grid ({selection.split} {selection.metric}, seed {spec.seeds[0]})",
            "",
            markdown(*grid_table(sweep, rows)),
            "",
        ]
    lines += [f"#### {spec.reported_split} {selection.metric}, mean ± std over seeds {seeds}", ""]
    lines += [markdown(*front_table(sweep, rows)), ""]
    if spec.baseline is not None:
        lines += [
            f"Paired differences are setting − {spec.baseline} seed by seed"
            + (" (sign flipped: lower is better)" if selection.goal == "min" else "")
            + "; the verdict is `holds` when their 95 % t-interval lies above zero, `does not hold` below it, "
            "`within noise` otherwise. Trainable counts exclude the task head; average over all steps.",
            "",
        ]
    return "\n".join(lines)


def print_report(sweep: Sweep, rows: list[Summary], console: Any) -> None:
    """The same tables in the terminal."""
    from rich.table import Table as RichTable

    tables = [("the front", front_table(sweep, rows))]
    if sweep.spec.lr is not None:
        tables.insert(0, ("learning-rate grid", grid_table(sweep, rows)))
    for title, (headers, body) in tables:
        table = RichTable(title=f"{sweep.path.name}: {title}")
        for i, header in enumerate(headers):
            table.add_column(header, justify="right" if i and _numeric(body[0][i] if body else "") else "left")
        for row in body:
            table.add_row(*row)
        console.print(table)


def front_points(sweep: Sweep, rows: list[Summary]) -> list[dict[str, Any]]:
    """The picture's data: per setting with seeds at its chosen rate, mean ± std against average trainable."""
    metric, split = sweep.spec.selection.metric, sweep.spec.reported_split
    points = []
    for row in rows:
        values = list(row.values(split, metric).values())
        trainable = row.trainable("trainable_average")
        if not values or trainable is None:
            continue
        mean, std = mean_std(values)
        points.append({"name": row.name, "trainable": trainable, "mean": mean, "std": std, "seeds": len(values)})
    return sorted(points, key=lambda p: p["trainable"])


def draw_front(sweep: Sweep, rows: list[Summary], paths: list[Path]) -> list[Path]:
    """The front: metric against average trainable parameters (log axis), error bars of one std over seeds."""
    points = front_points(sweep, rows)
    if not points:
        return []
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise AfloraError("the sweep's picture needs matplotlib: pip install 'aflora[plot]'") from None
    spec = sweep.spec
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.add_subplot()
    for point in points:
        baseline = point["name"] == spec.baseline
        axes.errorbar(
            point["trainable"], point["mean"], yerr=point["std"], fmt="s" if baseline else "o", capsize=4,
            color="black" if baseline else None,
        )  # fmt: skip
        axes.annotate(point["name"], (point["trainable"], point["mean"]), textcoords="offset points", xytext=(6, 4))
    axes.set_xscale("log")
    axes.set_xlabel("average trainable parameters (head excluded, log scale)")
    axes.set_ylabel(f"{spec.reported_split} {spec.selection.metric} (mean ± std over seeds)")
    axes.set_title(f"{sweep.path.name}: {spec.selection.metric} against trainable parameters")
    axes.grid(True, which="both", alpha=0.3)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    return paths
