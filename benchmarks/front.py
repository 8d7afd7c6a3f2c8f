"""Accuracy against trainable parameters on the encoder: more ranks and policies, to at_scale.py's protocol.

    python benchmarks/front.py [--jobs 1] [--threads 1]      # every run not in the results file yet
    python benchmarks/front.py --only lora_r1,aflora_r8       # only these settings (still in priority order)
    python benchmarks/front.py --report                      # tables from the raw results
    python benchmarks/front.py --smoke --out /tmp/s          # tiny runs (CI)

Same tasks, model, scale and protocol as `at_scale.py` (whose functions this script imports): MiniLM on
`movie_reviews` and `movie_reviews_rating`, the full training split, 536 optimizer steps, t_i / t_f = 20 % / 40 %;
each setting's learning rate chosen from LR_GRID on the validation split with seed 0 (head rate = adapter rate),
seeds 1 and 2 at the chosen value, test metric reported. A grid whose best value sits at its edge grows one
LADDER step past that edge (and again, while the new step wins, until the ladder ends), so that no choice is a
grid edge that was never looked past; this applies to at_scale.py's AFLoRA r=4 and LoRA r=8 too, whose extra
runs go in this script's file. New settings (SETTINGS):

- `lora_r1`, `lora_r2`: LoRA on all six linear types at rank 1 and 2 — rank 1 has about AFLoRA r=4's average
  trainable count, rank 2 about twice it;
- `lora_adaptive_r4`, `lora_adaptive_r8`: LoRA with every PM (attention and FFN) under adaptive freezing — all of
  them frozen by 60 % of training, after which only the head trains;
- `aflora_r8`, `aflora_r16`: AFLoRA (paper policy: FFN PMs adaptive, attention PMs frozen) at rank 8 and 16;
- `aflora_r4_attn_adaptive`: AFLoRA r=4 with the attention PMs adaptive too;
- `aflora_head_lr`: AFLoRA r=4 at its chosen adapter rate, with the head's rate from HEAD_LR_STEPS x that
  value, chosen on validation with seed 0. The point at head rate = adapter rate is AFLoRA r=4's own run (not
  run again), and so are its seeds 1 and 2 if that point is chosen.

Runs go in PRIORITY order, task by task (movie_reviews first): a setting's grid, then its seeds, then the next
setting. Each finished run is one JSON line in `<out>/front.jsonl` (at_scale.py's fields, plus `head_lr` and
the resolved `adapter` section); a restarted command skips the runs already there. The report and
`plot_front.py` read that file and `<out>/at_scale.jsonl` (only runs of the same scale), so at_scale.py's four
settings stand on the front beside the new ones.

Verdicts (paired test differences per seed, at_scale.py's 95 % t-interval), between settings of about the same
trainable count: AFLoRA r=4 vs LoRA r=1, and the AFLoRA-family setting (AFLORA_FAMILY) with the best mean
validation metric among those under LoRA r=8's average count vs LoRA r=8. Only settings with every seed at
their chosen value are judged.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from at_scale import (
    FULL,
    GRID_SEED,
    LR_GRID,
    MAIN_METRIC,
    MORE_SEEDS,
    SMOKE,
    TASKS,
    _mean_std,
    chosen_lr,
    read_results,
    recipe_with,
    run_one,
    run_pool,
    verdict,
)
from at_scale import RESULTS_FILE as AT_SCALE_FILE

from aflora_cli.commands.sweep.plan import grown_grid
from common import machine

HERE = Path(__file__).resolve().parent
RESULTS_FILE = "front.jsonl"

LORA = "LoRA, all six linear types"
AFLORA = "AFLoRA (FFN PMs adaptive, attention frozen)"
LORA_ADAPTIVE = "LoRA, every PM adaptive"
FAMILIES = (LORA, AFLORA, LORA_ADAPTIVE)  # the lines of the front, each by rank


@dataclass(frozen=True)
class Setting:
    """One point of the front: its adapter section, and the line of the plot it belongs to."""

    label: str
    family: str | None  # one of FAMILIES, or None for a point of its own
    adapter: dict[str, Any]
    head_grid: bool = False  # the grid is over the head's rate, at AFLoRA r=4's chosen adapter rate

    @property
    def rank(self) -> int:
        return int(self.adapter["rank"])


ADAPTIVE_ALL = {"attention": "adaptive", "ffn": "adaptive"}
SETTINGS: dict[str, Setting] = {
    # at_scale.py's (its method names)
    "aflora": Setting("AFLoRA r=4", AFLORA, {"method": "aflora", "rank": 4}),
    "lora": Setting("LoRA r=8", LORA, {"method": "lora", "rank": 8}),
    "pm_trainable": Setting(
        "AFLoRA r=4, FFN PMs trainable throughout",
        None,
        {"method": "aflora", "rank": 4, "policy": {"ffn": "trainable"}},
    ),
    "pm_frozen": Setting(
        "AFLoRA r=4, FFN PMs frozen throughout",
        None,
        {"method": "aflora", "rank": 4, "policy": {"ffn": "frozen"}},
    ),
    # this script's
    "lora_r1": Setting("LoRA r=1", LORA, {"method": "lora", "rank": 1}),
    "lora_r2": Setting("LoRA r=2", LORA, {"method": "lora", "rank": 2}),
    "lora_adaptive_r4": Setting(
        "LoRA r=4, every PM adaptive", LORA_ADAPTIVE, {"method": "lora", "rank": 4, "policy": ADAPTIVE_ALL}
    ),
    "lora_adaptive_r8": Setting(
        "LoRA r=8, every PM adaptive", LORA_ADAPTIVE, {"method": "lora", "rank": 8, "policy": ADAPTIVE_ALL}
    ),
    "aflora_r8": Setting("AFLoRA r=8", AFLORA, {"method": "aflora", "rank": 8}),
    "aflora_r16": Setting("AFLoRA r=16", AFLORA, {"method": "aflora", "rank": 16}),
    "aflora_r4_attn_adaptive": Setting(
        "AFLoRA r=4, attention PMs adaptive too", None, {"method": "aflora", "rank": 4, "policy": ADAPTIVE_ALL}
    ),
    "aflora_head_lr": Setting("AFLoRA r=4, head rate tuned", None, {"method": "aflora", "rank": 4}, head_grid=True),
}
# The order the runs go in (the budget of one session covers only the first few).
PRIORITY = (
    "aflora",  # at_scale.py's two: only runs past their grid's edge, and seeds at a new choice
    "lora",
    "lora_r1",
    "lora_adaptive_r8",
    "aflora_r8",
    "lora_r2",
    "lora_adaptive_r4",
    "aflora_r16",
    "aflora_r4_attn_adaptive",
    "aflora_head_lr",
)
LADDER = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)  # where a learning-rate grid may grow past LR_GRID's edges
BORROWED = ("pm_trainable", "pm_frozen")  # at_scale.py's ablations: AFLoRA r=4's rate there, never a grid here
HEAD_LR_STEPS = (0.1, 0.3, 1, 3)  # x AFLoRA r=4's chosen rate; the point at 1 is AFLoRA r=4's own run
AFLORA_FAMILY = ("aflora", "aflora_r8", "aflora_r16", "aflora_r4_attn_adaptive", "aflora_head_lr")
SEEDS = (GRID_SEED, *MORE_SEEDS)
LR_GRID_SETTINGS = [n for n, s in SETTINGS.items() if n not in BORROWED and not s.head_grid]

Point = tuple[float, float]  # (adapter lr, head lr)
Key = tuple[str, str, float, float, int]  # (task, setting, lr, head_lr, seed)


def _rate(value: float) -> float:
    """A rate without float noise: 0.01 * 0.3 -> 0.003."""
    return float(f"{value:.3g}")


class Runs:
    """The runs of both results files at one scale, by key, and what they imply: grids, choices, seeds."""

    def __init__(
        self,
        front: list[dict[str, Any]],
        at_scale: list[dict[str, Any]],
        scale: dict[str, Any],
        ladder: tuple[float, ...] = LADDER,
    ) -> None:
        self.at_scale = [r for r in at_scale if r.get("scale") == scale]
        self.front = [r for r in front if r.get("scale") == scale]
        self.ladder = ladder
        self.by_key: dict[Key, dict[str, Any]] = {}
        for r in self.at_scale:
            self.by_key[(r["task"], r["method"], r["lr"], r["lr"], r["seed"])] = r
        for r in self.front:
            self.by_key[(r["task"], r["method"], r["lr"], r["head_lr"], r["seed"])] = r
        for (task, method, lr, head_lr, seed), r in list(self.by_key.items()):
            if method == "aflora" and head_lr == lr:  # also the head-rate grid's point at head rate = adapter rate
                self.by_key[(task, "aflora_head_lr", lr, lr, seed)] = r

    @classmethod
    def from_folder(cls, folder: Path, scale: dict[str, Any], ladder: tuple[float, ...] = LADDER) -> Runs:
        return cls(read_results(folder / RESULTS_FILE), read_results(folder / AT_SCALE_FILE), scale, ladder)

    def grid(self, task: str, name: str) -> list[Point] | None:
        """The setting's grid points so far; None while they are not known (the head grid waits for AFLoRA r=4's
        rate) or for a setting that borrows at_scale.py's choice. A learning-rate grid starts as LR_GRID and,
        once run, grows one ladder step past whichever edge holds the best validation value, until the best is
        inside or the ladder ends."""
        setting = SETTINGS[name]
        if setting.head_grid:
            anchor = self.chosen(task, "aflora")
            return None if anchor is None else [(anchor[0], _rate(anchor[0] * step)) for step in HEAD_LR_STEPS]
        if name in BORROWED:
            return None
        rates = grown_grid(LR_GRID, self.ladder, lambda lr: self._validation(task, name, (lr, lr)))
        return [(lr, lr) for lr in rates]

    def _validation(self, task: str, name: str, point: Point) -> float | None:
        """Seed GRID_SEED's validation metric at the point; None if it has not run."""
        run = self.by_key.get((task, name, *point, GRID_SEED))
        return None if run is None else float(run["metrics"]["validation"][MAIN_METRIC[task]])

    def _best(self, points: list[Point], task: str, name: str) -> Point | None:
        """The point with the best validation metric for seed GRID_SEED (the smaller rates on a tie); None until
        every point has run."""
        scores = {p: self._validation(task, name, p) for p in points}
        if any(score is None for score in scores.values()):
            return None
        return max(points, key=lambda p: (scores[p], -p[1], -p[0]))

    def chosen(self, task: str, name: str) -> Point | None:
        """The grid point with the best validation metric for seed GRID_SEED; None until the grid is complete."""
        if name in BORROWED:
            lr = chosen_lr(self.at_scale, task, name)
            return None if lr is None else (lr, lr)
        points = self.grid(task, name)
        return None if points is None else self._best(points, task, name)

    def seeds(self, task: str, name: str) -> dict[int, dict[str, Any]]:
        """The runs at the chosen point, by seed."""
        point = self.chosen(task, name)
        if point is None:
            return {}
        return {s: self.by_key[(task, name, *point, s)] for s in SEEDS if (task, name, *point, s) in self.by_key}

    def plan(self, tasks: list[str], names: list[str]) -> list[Key]:
        """The runs not done yet that can start now, in PRIORITY order task by task: grid, then seeds."""
        planned: list[Key] = []
        for task in tasks:
            for name in PRIORITY:
                if name not in names:
                    continue
                points = self.grid(task, name) or []
                planned += [(task, name, lr, head_lr, GRID_SEED) for lr, head_lr in points]
                chosen = self.chosen(task, name)
                if chosen is not None:
                    planned += [(task, name, *chosen, seed) for seed in MORE_SEEDS]
        return [key for key in planned if key not in self.by_key]


# ---- the runs --------------------------------------------------------------------------------------


def _train(key: Key, work: Path, scale: dict[str, Any]) -> dict[str, Any]:
    """One run in a pool process; its record for the results file."""
    task, name, lr, head_lr, seed = key
    adapter = SETTINGS[name].adapter
    overrides: dict[str, Any] = {"adapter": adapter, "training": {"head_lr": head_lr}}
    run_dir = work / f"{task}-{name}-{lr}-{head_lr}-{seed}"
    try:
        measured = run_one(recipe_with(task, overrides, lr, seed, scale, run_dir))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "task": task,
        "method": name,
        "lr": lr,
        "head_lr": head_lr,
        "seed": seed,
        "phase": "grid" if seed == GRID_SEED else "seeds",
        "adapter": adapter,
        "scale": scale,
        **measured,
        "machine": machine(),  # in the worker, so that torch_threads is the runs' own
    }


def _describe(key: Key) -> str:
    task, name, lr, head_lr, seed = key
    head = "" if head_lr == lr else f" head lr {head_lr:g}"
    return f"{task} {name} lr {lr:g}{head} seed {seed}"


def run_all(args: argparse.Namespace, scale: dict[str, Any]) -> None:
    """Every outstanding run, `args.jobs` at a time; new runs are planned whenever one finishes."""
    out = Path(args.out)
    at_scale = read_results(out / AT_SCALE_FILE)

    def plan(records: list[dict[str, Any]]) -> list[Key]:
        return Runs(records, at_scale, scale, args.ladder).plan(args.tasks, args.only)

    train = functools.partial(_train, scale=scale)
    run_pool(out / RESULTS_FILE, plan, train, _describe, args.jobs, args.threads)


# ---- the report ------------------------------------------------------------------------------------


@dataclass
class Summary:
    """One setting on one task: its choice, its seeds there, and whether every seed is done."""

    name: str
    task: str
    grid: list[Point] | None
    grid_done: int
    chosen: Point | None
    seeds: dict[int, dict[str, Any]] = field(default_factory=dict)
    trainable: float | None = None  # mean of the runs' average trainable count (head excluded)

    @property
    def setting(self) -> Setting:
        return SETTINGS[self.name]

    @property
    def complete(self) -> bool:
        return self.chosen is not None and set(self.seeds) == set(SEEDS)

    @property
    def status(self) -> str:
        if self.complete:
            return "complete"
        if self.chosen is not None:
            return f"incomplete: seeds {', '.join(map(str, sorted(self.seeds)))} of {len(SEEDS)}"
        if self.grid is None:
            return "not run (waits for at_scale.py's AFLoRA rate)" if self.setting.head_grid else "not run"
        if not self.grid_done:
            return "not run"
        return f"incomplete: grid {self.grid_done} of {len(self.grid)}"

    def values(self, split: str) -> list[float]:
        metric = MAIN_METRIC[self.task]
        return [self.seeds[s]["metrics"][split][metric] for s in sorted(self.seeds)]


def summarize(runs: Runs, task: str, name: str) -> Summary:
    grid = runs.grid(task, name)
    done = sum((task, name, *p, GRID_SEED) in runs.by_key for p in grid or [])
    summary = Summary(name, task, grid, done, runs.chosen(task, name), runs.seeds(task, name))
    grid_runs = [runs.by_key.get((task, name, *p, GRID_SEED)) for p in grid or []]
    counted = list(summary.seeds.values()) or [r for r in grid_runs if r is not None]
    if counted:
        summary.trainable = statistics.mean(r["trainable_average"] for r in counted)
    return summary


def summaries(runs: Runs, task: str) -> list[Summary]:
    """Every setting on the task, fewest average trainable parameters first (settings without runs last)."""
    rows = [summarize(runs, task, name) for name in SETTINGS]
    order = list(SETTINGS)
    return sorted(rows, key=lambda s: (s.trainable is None, s.trainable or 0.0, order.index(s.name)))


def _cell(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    mean, std = _mean_std(values)
    return f"{mean:.4f} ± {std:.4f}"


def _paired(better: Summary, worse: Summary, name: str) -> str:
    """One row of the verdict table; not judged unless both settings have every seed."""
    counts = " vs ".join("—" if s.trainable is None else f"{s.trainable:,.0f}" for s in (better, worse))
    missing = [s.setting.label for s in (better, worse) if not s.complete]
    if missing:
        return f"| {name} | {counts} | — | — | not judged: {' and '.join(missing)} incomplete |"
    test = {s.name: dict(zip(sorted(s.seeds), s.values("test"), strict=True)) for s in (better, worse)}
    diffs = [test[better.name][seed] - test[worse.name][seed] for seed in SEEDS]
    mean, std = _mean_std(diffs)
    per_seed = ", ".join(f"{d:+.4f}" for d in diffs)
    return f"| {name} | {counts} | {per_seed} | {mean:+.4f} ± {std:.4f} | {verdict(diffs)} |"


def report(runs: Runs, tasks: list[str]) -> str:
    """Markdown: the grids on validation, the front on test, and the paired verdicts at matched counts."""
    lines = [
        "Protocol of at_scale.py (536 optimizer steps, learning rate chosen on validation with seed "
        f"{GRID_SEED} from {', '.join(f'{lr:g}' for lr in LR_GRID)} — a grid whose best value is at its edge "
        f"grows one step past it, within {', '.join(f'{lr:g}' for lr in runs.ladder)}, until the best is inside — "
        f"head rate = adapter rate unless tuned, seeds {', '.join(map(str, SEEDS))} at the chosen value); "
        "at_scale.py's four settings are its own runs, plus the steps their grids grew here.",
        "",
    ]
    for task in tasks:
        metric = MAIN_METRIC[task]
        rows = summaries(runs, task)
        by_name = {s.name: s for s in rows}
        shown = sorted({lr for name in LR_GRID_SETTINGS for lr, _ in by_name[name].grid or []})
        lines += [f"#### {task}: learning-rate grids (validation {metric}, seed {GRID_SEED})", ""]
        lines += ["| setting | " + " | ".join(f"lr {lr:g}" for lr in shown) + " | chosen |"]
        lines += ["|---|" + "---:|" * (len(shown) + 1)]
        for name in LR_GRID_SETTINGS:
            summary = by_name[name]
            cells = []
            for lr in shown:
                run = runs.by_key.get((task, name, lr, lr, GRID_SEED))
                cells.append("—" if run is None else f"{run['metrics']['validation'][metric]:.4f}")
            chosen = "—" if summary.chosen is None else f"{summary.chosen[0]:g}"
            lines.append(f"| {summary.setting.label} | " + " | ".join(cells) + f" | {chosen} |")
        head = by_name["aflora_head_lr"]
        lines.append("")
        if head.grid is None:
            lines += ["Head-rate grid of AFLoRA r=4: waits for AFLoRA r=4's learning-rate grid on this task.", ""]
        else:
            lr = head.grid[0][0]
            lines += [f"AFLoRA r=4 at its chosen rate {lr:g}, head-rate grid (validation {metric}, seed {GRID_SEED}):"]
            lines += ["", "| setting | " + " | ".join(f"head lr {h:g}" for _, h in head.grid) + " | chosen |"]
            lines += ["|---|" + "---:|" * (len(head.grid) + 1)]
            cells = []
            for point in head.grid:
                run = runs.by_key.get((task, "aflora_head_lr", *point, GRID_SEED))
                cells.append("—" if run is None else f"{run['metrics']['validation'][metric]:.4f}")
            chosen = "—" if head.chosen is None else f"{head.chosen[1]:g}"
            lines += [f"| {head.setting.label} | " + " | ".join(cells) + f" | {chosen} |", ""]

        lines += [f"#### {task}: the front (test {metric}, mean ± std over seeds at the chosen value)", ""]
        lines += ["| setting | lr | head lr | seeds | test | validation | avg trainable (no head) | status |"]
        lines += ["|---|---:|---:|---:|---:|---:|---:|---|"]
        for s in rows:
            lr, head_lr = ("—", "—") if s.chosen is None else (f"{s.chosen[0]:g}", f"{s.chosen[1]:g}")
            trainable = "—" if s.trainable is None else f"{s.trainable:,.0f}"
            lines.append(
                f"| {s.setting.label} | {lr} | {head_lr} | {len(s.seeds)} | {_cell(s.values('test'))} | "
                f"{_cell(s.values('validation'))} | {trainable} | {s.status} |"
            )

        lines += ["", "| comparison | avg trainable (no head) | paired test differences per seed | mean ± std "]
        lines[-1] += "| verdict (95 % t-interval) |"
        lines += ["|---|---:|---|---:|---|"]
        lines.append(_paired(by_name["aflora"], by_name["lora_r1"], "AFLoRA r=4 >= LoRA r=1 (about the same count)"))
        lora = by_name["lora"]
        under = [
            by_name[n] for n in AFLORA_FAMILY if lora.trainable is None or (by_name[n].trainable or 0) < lora.trainable
        ]
        complete = [s for s in under if s.complete]
        waiting = [s.setting.label for s in under if not s.complete]
        if complete:
            best = max(complete, key=lambda s: (statistics.mean(s.values("validation")), -(s.trainable or 0)))
            so_far = f"; {len(waiting)} candidates incomplete" if waiting else ""
            name = f"{best.setting.label} (best AFLoRA-family validation under LoRA r=8's count{so_far}) >= LoRA r=8"
            lines.append(_paired(best, lora, name))
        else:
            lines.append(
                "| best AFLoRA-family setting under LoRA r=8's count >= LoRA r=8 | — | — | — | "
                "not judged: no candidate complete |"
            )
        lines.append("")
        lines.append(
            "AFLoRA-family settings under LoRA r=8's average count (the one with the best mean validation "
            f"{metric} is judged): complete: {'; '.join(s.setting.label for s in complete) or 'none'}"
            + (f"; incomplete, not considered: {'; '.join(waiting)}." if waiting else ".")
        )
        lines += ["", cost_table(runs.front, task, RESULTS_FILE), ""]
    return "\n".join(lines)


def cost_table(
    records: list[dict[str, Any]],
    task: str,
    file: str,
    seconds: str = "train_time_s",
    label: str = "training CPU-hours (train time x torch threads)",
) -> str:
    """Markdown: how many runs of the task the results file holds and their CPU time (the records' `seconds`
    field x torch threads; for train_time_s, model loading and evaluation are not counted)."""
    mine = [r for r in records if r["task"] == task]
    hours = sum(r[seconds] * r["machine"]["torch_threads"] for r in mine) / 3600
    return f"| runs of {task} in {file} | {label} |\n|---:|---:|\n| {len(mine)} | {hours:.1f} |"


def parse_names(text: str, known: tuple[str, ...]) -> list[str]:
    """`--only`'s comma-separated setting names, each one of `known`."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        known_names = ", ".join(known)
        raise argparse.ArgumentTypeError(f"{', '.join(unknown)}: not a setting of this script; one of {known_names}")
    return names


def parse_only(text: str) -> list[str]:
    return parse_names(text, PRIORITY)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="only print the tables from the results files")
    parser.add_argument("--smoke", action="store_true", help="tiny runs, to check the script end to end")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder of front.jsonl and at_scale.jsonl")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--only", type=parse_only, metavar="NAME,...", help="only these settings (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side")
    parser.add_argument("--threads", type=int, help="torch threads per run")
    args = parser.parse_args()
    scale = SMOKE if args.smoke else FULL
    if args.smoke:  # one task; the first setting unless --only names others
        args.tasks = args.tasks[:1]
    args.only = args.only or list(PRIORITY[:1] if args.smoke else PRIORITY)
    args.ladder = LR_GRID if args.smoke else LADDER  # smoke runs check the script, not where a grid ends
    if not args.report:
        run_all(args, scale)
    print(report(Runs.from_folder(Path(args.out), scale, args.ladder), args.tasks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
