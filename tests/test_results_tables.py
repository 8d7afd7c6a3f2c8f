"""benchmarks/RESULTS.md's tables recomputed from the committed raw results: every table row the scripts' own
reports print today stands in RESULTS.md word for word, so a claim there cannot drift from the raw files."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import front
import front_lm
import storage_learning

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
