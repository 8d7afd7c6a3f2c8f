"""benchmarks/RESULTS.md's tables recomputed from the committed raw results: every table row the scripts' own
reports print today stands in RESULTS.md word for word, so a claim there cannot drift from the raw files."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import front
import front_lm
import legacy_results
import storage_learning

from aflora_cli.commands.sweep.plan import Progress
from aflora_cli.commands.sweep.report import front_table, grid_table, summarize
from aflora_cli.commands.sweep.spec import load_sweep
from aflora_cli.commands.sweep.stats import paired

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _table_rows(report: str) -> list[str]:
    return [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| setting |")]


def _missing(report: str) -> list[str]:
    results = (BENCHMARKS / "RESULTS.md").read_text(encoding="utf-8")
    return [row for row in _table_rows(report) if row not in results]


def test_the_front_tables_match_front_jsonl() -> None:
    runs = front.Runs.from_folder(BENCHMARKS / "results", front.FULL)
    report = front.report(runs, ["movie_reviews"])
    assert len(_table_rows(report)) > 10
    assert _missing(report) == []


def test_the_lm_front_tables_match_front_lm_jsonl() -> None:
    runs = front_lm.Runs.from_folder(BENCHMARKS / "results")
    report = front_lm.report(runs, list(front_lm.TASKS))
    assert len(runs.records) >= 2
    assert _missing(report) == []


def test_the_storage_learning_table_matches_its_raw_file() -> None:
    records = storage_learning.read(storage_learning.RESULTS)
    report = storage_learning.report(records)
    assert {r["storage"] for r in records} == {"fp32", "bf16", "nf4"}
    assert _missing(report) == []


def test_the_sweep_report_reproduces_the_front_rows() -> None:
    """benchmarks/sweeps/front-movie-reviews.yaml's report, from the committed raw files through the sweep's own
    planning and report code: every grid row, every front row (chosen rate, test and validation mean ± std, average
    trainable count) and the matched-count verdict stand in RESULTS.md as front.py printed them."""
    sweep = load_sweep(BENCHMARKS / "sweeps" / "front-movie-reviews.yaml")
    raw = [BENCHMARKS / "results" / name for name in ("at_scale.jsonl", "front.jsonl")]
    records = legacy_results.sweep_records(
        sweep, raw, lambda r: r["task"] == "movie_reviews" and r.get("scale") == front.FULL
    )
    progress = Progress(sweep, records)
    rows = summarize(sweep, progress)
    assert progress.plan() == [] and all(row.complete for row in rows)
    label = {name: front.SETTINGS[name].label for name in sweep.names}
    expected = []
    for cells in grid_table(sweep, rows)[1]:
        expected.append("| " + " | ".join([label[cells[0]], *cells[1:]]) + " |")
    for name, lr, seeds, test, validation, average, *_ in front_table(sweep, rows)[1]:
        expected.append(f"| {label[name]} | {lr} | {lr} | {seeds} | {test} | {validation} | {average} | complete |")
    by_name = {row.name: row for row in rows}
    aflora, lora = by_name["aflora"], by_name["lora_r1"]
    test = paired(
        [a - b for a, b in zip(aflora.values("test", "accuracy").values(), lora.values("test", "accuracy").values())]
    )
    counts = f"{aflora.trainable('trainable_average'):,.0f} vs {lora.trainable('trainable_average'):,.0f}"
    per_seed = ", ".join(f"{d:+.4f}" for d in test.differences)
    expected.append(
        f"| AFLoRA r=4 >= LoRA r=1 (about the same count) | {counts} | {per_seed} | "
        f"{test.mean:+.4f} ± {test.std:.4f} | {test.verdict} |"
    )
    results = (BENCHMARKS / "RESULTS.md").read_text(encoding="utf-8")
    assert len(expected) == 2 * len(sweep.names) + 1
    assert [row for row in expected if row not in results] == []
