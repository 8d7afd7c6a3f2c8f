"""The accuracy-against-trainable-parameters front of one task, drawn from the raw results files only.

    python benchmarks/plot_front.py                                   # docs/pareto-movie-reviews.png
    python benchmarks/plot_front.py --task movie_reviews_rating       # docs/pareto-movie-reviews-rating.png
    python benchmarks/plot_front.py --lm                              # docs/pareto-lm.png (front_lm.py)
    python benchmarks/plot_front.py --lm --task movie_reviews_words   # docs/pareto-lm-movie-reviews-words.png

Reads `front.jsonl` and `at_scale.jsonl` from `--results` (runs of the full scale only) through front.py's
own summaries. Each setting is a point at its chosen learning rate: test metric mean ± std over seeds against
the average trainable parameter count (head excluded), log x axis. LoRA, AFLoRA and LoRA-with-adaptive-PMs are
one line each, by rank, through their completed settings; the other settings (at_scale.py's two ablations,
AFLoRA with attention PMs adaptive, AFLoRA with a tuned head rate) are points of their own. A setting whose
grid is done but whose seeds are not is drawn hollow, without error bar or line (seed 0 alone); settings
without a chosen value are not drawn.

`--lm` draws part 2 the same way from `front_lm.jsonl` (SmolLM2; bbc_headlines, test ROUGE-L, unless `--task`
names its other task): LoRA is one line by rank, each AFLoRA setting a point of its own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import front_lm
from front import FAMILIES, FULL, MAIN_METRIC, TASKS, Runs, Summary, _mean_std, summaries

ROOT = Path(__file__).resolve().parents[1]


def _point(summary: Summary | front_lm.Summary, metric: str) -> dict[str, Any] | None:
    """A setting's point: the seeds' test mean ± std if complete, else seed 0's run at the chosen value alone;
    None while there is no choice (or no seed 0 at it)."""
    if summary.chosen is None or not summary.seeds or summary.trainable is None:
        return None
    if not summary.complete and 0 not in summary.seeds:
        return None
    test = summary.values("test")
    if not summary.complete:  # seed 0 alone: the grid run at the chosen value
        test = [summary.seeds[0]["metrics"]["test"][metric]]
    mean, std = _mean_std(test)
    return {
        "name": summary.name,
        "label": summary.setting.label,
        "rank": summary.setting.rank,
        "trainable": summary.trainable,
        "mean": mean,
        "std": std,
        "seeds": len(test),
        "complete": summary.complete,
    }


def _place(
    points: list[tuple[str | None, dict[str, Any] | None]], families: tuple[str, ...]
) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """Points by family (each line by rank) and the points of their own (family None)."""
    lines: dict[str, list[dict[str, Any]]] = {family: [] for family in families}
    singles: list[dict[str, Any]] = []
    for family, point in points:
        if point is not None:
            (lines[family] if family else singles).append(point)
    for line in lines.values():
        line.sort(key=lambda p: p["rank"])
    return lines, singles


def front_data(runs: Runs, task: str) -> dict[str, Any]:
    """The points to draw, as plain data: per family (and for the single points) rank, x, y, error, seeds."""
    lines, singles = _place([(s.setting.family, _point(s, MAIN_METRIC[task])) for s in summaries(runs, task)], FAMILIES)
    title = f"{task}: all-MiniLM-L6-v2, 536 steps, each setting at its own best learning rate"
    return {"task": task, "metric": MAIN_METRIC[task], "title": title, "lines": lines, "singles": singles}


def lm_front_data(runs: front_lm.Runs, task: str = "bbc_headlines") -> dict[str, Any]:
    """front_data for front_lm.py's runs on one task: the LoRA line by rank, each AFLoRA setting a point of its own."""
    metric = front_lm.MAIN_METRIC[task]
    lines, singles = _place(
        [(s.setting.family, _point(s, metric)) for s in front_lm.summaries(runs, task)], (front_lm.LORA,)
    )
    steps = runs.scales[task]["max_steps"]
    title = f"{front_lm.TASKS[task].title}: SmolLM2-135M-Instruct, {steps} steps, each setting at its own best lr"
    return {"task": task, "metric": metric, "title": title, "lines": lines, "singles": singles}


def draw(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*X"
    color_index = 0
    for family, points in data["lines"].items():
        if not points:
            continue
        color = colors[color_index % len(colors)]
        color_index += 1
        done = [p for p in points if p["complete"]]
        if done:
            ax.errorbar(
                [p["trainable"] for p in done],
                [p["mean"] for p in done],
                yerr=[p["std"] for p in done],
                color=color,
                marker="o",
                capsize=3,
                label=family,
            )
        for p in points:
            if not p["complete"]:
                ax.plot(p["trainable"], p["mean"], marker="o", color=color, markerfacecolor="none", linestyle="")
            ax.annotate(f"r={p['rank']}", (p["trainable"], p["mean"]), textcoords="offset points", xytext=(5, 4))
    for i, p in enumerate(data["singles"]):
        color = colors[(color_index + i) % len(colors)]
        style = {"markerfacecolor": "none"} if not p["complete"] else {}
        ax.errorbar(
            [p["trainable"]],
            [p["mean"]],
            yerr=[p["std"]] if p["complete"] else None,
            color=color,
            marker=markers[(i + 1) % len(markers)],
            linestyle="",
            capsize=3,
            label=p["label"] + ("" if p["complete"] else " (seed 0 only)"),
            **style,
        )
    if any(not p["complete"] for points in data["lines"].values() for p in points):
        ax.plot([], [], marker="o", color="grey", markerfacecolor="none", linestyle="", label="hollow: seed 0 only")
    ax.set_xscale("log")
    ax.set_xlabel("average trainable parameters over training (head excluded)")
    ax.set_ylabel(f"test {data['metric']} (mean ± std over seeds)")
    ax.set_title(data["title"], fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing finished yet: an empty frame, without a legend
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--task", choices=[*TASKS, *front_lm.TASKS], help="default: movie_reviews, or with --lm bbc_headlines"
    )
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="folder of the raw files")
    parser.add_argument("--lm", action="store_true", help="front_lm.py's front (SmolLM2) instead")
    parser.add_argument(
        "--out", help="image path (default: docs/pareto-[lm-]<task>.png, docs/pareto-lm.png for bbc_headlines)"
    )
    args = parser.parse_args()
    tasks = front_lm.TASKS if args.lm else TASKS
    task = args.task or next(iter(tasks))
    if task not in tasks:
        parser.error(f"--task {task}: not a task of {'front_lm.py' if args.lm else 'front.py'}; one of {list(tasks)}")
    name = ("lm" if task == "bbc_headlines" else f"lm-{task}") if args.lm else task
    out = Path(args.out) if args.out else ROOT / "docs" / f"pareto-{name.replace('_', '-')}.png"
    if args.lm:
        data = lm_front_data(front_lm.Runs.from_folder(Path(args.results)), task)
    else:
        data = front_data(Runs.from_folder(Path(args.results), FULL), task)
    draw(data, out)
    drawn = [p["label"] for points in data["lines"].values() for p in points] + [p["label"] for p in data["singles"]]
    print(f"{out}: {len(drawn)} settings ({', '.join(drawn)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
