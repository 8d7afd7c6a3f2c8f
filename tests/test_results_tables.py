"""benchmarks/RESULTS.md's tables recomputed from the committed raw results: every table row the scripts' own
reports print today stands in RESULTS.md word for word, so a claim there cannot drift from the raw files."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import at_scale
import front
import front_lm
import legacy_results
import storage_learning

from aflora_cli.commands.sweep.plan import Progress
from aflora_cli.commands.sweep.report import front_table, grid_table, summarize
from aflora_cli.commands.sweep.spec import load_sweep
from aflora_cli.commands.sweep.stats import paired

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS = (BENCHMARKS / "RESULTS.md").read_text(encoding="utf-8")


def _table_rows(report: str) -> list[str]:
    return [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| setting |")]


def _missing(report: str) -> list[str]:
    results = (BENCHMARKS / "RESULTS.md").read_text(encoding="utf-8")
    return [row for row in _table_rows(report) if row not in results]


def test_the_at_scale_tables_match_at_scale_jsonl() -> None:
    """at_scale.py's claims, with the sweep's statistics (its mean ± std and 95 % t-interval verdicts)."""
    report = at_scale.report(at_scale.read_results(BENCHMARKS / "results" / "at_scale.jsonl"), list(at_scale.TASKS))
    assert len(_table_rows(report)) > 20
    assert _missing(report) == []


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


def _sweep_rows(spec: str, files: tuple[str, ...], task: str, scale: dict) -> tuple[list, dict]:
    """The spec's summaries from the committed raw files (runs of `task` at `scale`), through the sweep's own
    planning and report code; every setting complete."""
    sweep = load_sweep(BENCHMARKS / "sweeps" / spec)
    raw = [BENCHMARKS / "results" / name for name in files]
    records = legacy_results.sweep_records(sweep, raw, lambda r: r["task"] == task and r.get("scale") == scale)
    progress = Progress(sweep, records)
    rows = summarize(sweep, progress)
    assert progress.plan() == [] and all(row.complete for row in rows)
    return [grid_table(sweep, rows)[1], front_table(sweep, rows)[1]], {row.name: row for row in rows}


def _comparison(name: str, better, worse, metric: str) -> str:
    """A verdict row as the scripts print it, from the sweep's paired statistics."""
    values = [s.values("test", metric).values() for s in (better, worse)]
    test = paired([b - w for b, w in zip(*values, strict=True)])
    counts = " vs ".join(f"{s.trainable('trainable_average'):,.0f}" for s in (better, worse))
    per_seed = ", ".join(f"{d:+.4f}" for d in test.differences)
    return f"| {name} | {counts} | {per_seed} | {test.mean:+.4f} ± {test.std:.4f} | {test.verdict} |"


def test_the_sweep_report_reproduces_the_encoder_front_rows() -> None:
    """benchmarks/sweeps/front-movie-reviews.yaml's report: every grid row, every front row (chosen rate, test and
    validation mean ± std, average trainable count) and the matched-count verdict stand in RESULTS.md as
    front.py printed them."""
    (grid, table), by_name = _sweep_rows(
        "front-movie-reviews.yaml", ("at_scale.jsonl", "front.jsonl"), "movie_reviews", front.FULL
    )
    label = {name: front.SETTINGS[name].label for name in by_name}
    expected = ["| " + " | ".join([label[cells[0]], *cells[1:]]) + " |" for cells in grid]
    for name, lr, seeds, test, validation, average, *_ in table:
        expected.append(f"| {label[name]} | {lr} | {lr} | {seeds} | {test} | {validation} | {average} | complete |")
    expected.append(
        _comparison("AFLoRA r=4 >= LoRA r=1 (about the same count)", by_name["aflora"], by_name["lora_r1"], "accuracy")
    )
    assert len(expected) == 2 * len(by_name) + 1
    assert [row for row in expected if row not in RESULTS] == []


def test_the_sweep_report_reproduces_the_lm_front_rows() -> None:
    """benchmarks/sweeps/front-lm-bbc-headlines.yaml's report: the grid rows, the front rows (with the minutes per
    run, from the records) and the three verdicts stand in RESULTS.md as front_lm.py printed them."""
    task = "bbc_headlines"
    (grid, table), by_name = _sweep_rows(
        "front-lm-bbc-headlines.yaml", ("front_lm.jsonl",), task, front_lm.SCALES[task]
    )
    label = {name: front_lm.SETTINGS[name].label for name in by_name}
    expected = ["| " + " | ".join([label[cells[0]], *cells[1:]]) + " |" for cells in grid]
    for name, lr, seeds, test, validation, average, final, *_ in table:
        minutes = sum(r["seconds"] for r in by_name[name].seeds.values()) / len(by_name[name].seeds) / 60
        row = [label[name], lr, seeds, test, validation, average, final, f"{minutes:.1f}", "complete"]
        expected.append("| " + " | ".join(row) + " |")
    for name, better, worse in front_lm.COMPARISONS:
        expected.append(_comparison(name, by_name[better], by_name[worse], "rougeL"))
    assert len(expected) == 2 * len(by_name) + 3
    assert [row for row in expected if row not in RESULTS] == []
