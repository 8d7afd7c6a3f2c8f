"""benchmarks/RESULTS.md's tables recomputed from the committed raw results: every table row stands in RESULTS.md
word for word, so a claim there cannot drift from the raw files.

The experiments are sweep specs in benchmarks/sweeps/; their raw files (written by the scripts they replaced) are
read through benchmarks/legacy_results.py and summarized by the sweep's own planning, report and statistics code.
What a spec cannot express is recomputed here from the raw records: front.py's head-rate grid, the runs' CPU-hours
and the LM's generated movie_reviews_words task (the same protocol as bbc_headlines, scored by exact match)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import legacy_results
import storage_learning

from aflora_cli.commands.sweep.plan import Progress
from aflora_cli.commands.sweep.report import Summary, front_table, grid_table, summarize
from aflora_cli.commands.sweep.spec import Selection, Sweep, load_sweep
from aflora_cli.commands.sweep.stats import mean_std, paired
from common import read_jsonl

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RAW = BENCHMARKS / "results"
RESULTS = (BENCHMARKS / "RESULTS.md").read_text(encoding="utf-8")

# The row labels RESULTS.md gives the specs' settings.
AT_SCALE_LABELS = {
    "aflora": "AFLoRA (r=4, FFN adaptive, attention frozen)",
    "lora": "LoRA (r=8, all linear layers)",
    "pm_trainable": "FFN PMs trainable throughout",
    "pm_frozen": "FFN PMs frozen throughout",
}
FRONT_LABELS = {
    "aflora": "AFLoRA r=4",
    "lora": "LoRA r=8",
    "lora_r1": "LoRA r=1",
    "lora_r2": "LoRA r=2",
    "lora_adaptive_r4": "LoRA r=4, every PM adaptive",
    "lora_adaptive_r8": "LoRA r=8, every PM adaptive",
    "aflora_r8": "AFLoRA r=8",
    "aflora_r16": "AFLoRA r=16",
    "aflora_r4_attn_adaptive": "AFLoRA r=4, attention PMs adaptive too",
    "pm_trainable": "AFLoRA r=4, FFN PMs trainable throughout",
    "pm_frozen": "AFLoRA r=4, FFN PMs frozen throughout",
}
LM_LABELS = {
    "aflora_r4": "AFLoRA r=4",
    "lora_r1": "LoRA r=1",
    "lora_r8": "LoRA r=8",
    "aflora_gsm8k": "AFLoRA r=4, authors' GSM8K settings",
}
LM_COMPARISONS = (
    ("AFLoRA r=4 >= LoRA r=1 (about the same average count)", "aflora_r4", "lora_r1"),
    ("AFLoRA r=4 >= LoRA r=8", "aflora_r4", "lora_r8"),
    ("AFLoRA, authors' GSM8K settings >= LoRA r=8", "aflora_gsm8k", "lora_r8"),
)
AT_SCALE_CLAIMS = (
    ("AFLoRA >= LoRA (Table 1)", "aflora", "lora"),
    ("adaptive >= PMs trainable throughout (Table 2)", "aflora", "pm_trainable"),
    ("PMs trainable >= PMs frozen throughout (Table 2)", "pm_trainable", "pm_frozen"),
    ("adaptive >= PMs frozen throughout (Table 2)", "aflora", "pm_frozen"),
)


def _missing(rows: list[str]) -> list[str]:
    return [row for row in rows if row not in RESULTS]


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def _raw(name: str) -> list[dict[str, Any]]:
    return read_jsonl(RAW / name)


def _summaries(sweep: Sweep, records: list[dict[str, Any]]) -> dict[str, Summary]:
    """The spec's summaries from committed raw runs, through the sweep's own planning and report code; every
    setting complete (nothing left to run)."""
    progress = Progress(sweep, records)
    rows = summarize(sweep, progress)
    assert progress.plan() == [] and all(row.complete for row in rows)
    return {row.name: row for row in rows}


def _spec_summaries(spec: str) -> tuple[Sweep, dict[str, Summary]]:
    """A spec of benchmarks/sweeps/ over its committed runs (legacy_results.SOURCES names their file and task)."""
    sweep = load_sweep(BENCHMARKS / "sweeps" / spec)
    return sweep, _summaries(sweep, legacy_results.spec_records(sweep))


def _comparison(name: str, better: Summary, worse: Summary, metric: str, counts: bool = True) -> str:
    """A verdict row as RESULTS.md prints it, from the sweep's paired statistics of the test metric."""
    values = [s.values("test", metric).values() for s in (better, worse)]
    test = paired([b - w for b, w in zip(*values, strict=True)])
    per_seed = ", ".join(f"{d:+.4f}" for d in test.differences)
    cells = [name, per_seed, f"{test.mean:+.4f} ± {test.std:.4f}", test.verdict]
    if counts:
        cells.insert(1, " vs ".join(f"{s.trainable('trainable_average'):,.0f}" for s in (better, worse)))
    return _row(*cells)


def _mean_seconds(summary: Summary) -> float:
    return statistics.mean(r["seconds"] for r in summary.seeds.values())


def _cpu_hours_row(records: list[dict[str, Any]], task: str, seconds: str) -> str:
    """The count of a task's runs in a raw file and their CPU-hours (seconds x torch threads)."""
    mine = [r for r in records if r["task"] == task]
    hours = sum(r[seconds] * r["machine"]["torch_threads"] for r in mine) / 3600
    return _row(str(len(mine)), f"{hours:.1f}")


def _at_scale_rows(task: str, metric: str, parts: list[tuple[Sweep, dict[str, Summary]]]) -> list[str]:
    """at_scale.py's three tables of one task: the grid (every rate seed 0 ran at, across the specs), the seeds at
    each chosen rate (with the mean train time), and the paired claims."""
    by_name = {name: (sweep, s) for sweep, summaries in parts for name, s in summaries.items()}
    rates = sorted({lr for _, s in by_name.values() for lr in s.scores if lr is not None})
    rows = [_row("method", *(f"lr {lr:g}" for lr in rates), "chosen")]
    for name, (sweep, s) in by_name.items():
        assert s.chosen is not None and s.chosen.lr is not None
        cells = [f"{s.scores[lr]:.4f}" if lr in s.scores else "—" for lr in rates]
        chosen = f"{s.chosen.lr:g}" + (" (no grid: aflora's)" if len(sweep.spec.lr.ladder) == 1 else "")  # type: ignore[union-attr]
        rows.append(_row(AT_SCALE_LABELS[name], *cells, chosen))
        _, front = front_table(sweep, [s])
        _, lr, seeds, test, validation, average, *_ = front[0]
        rows.append(_row(AT_SCALE_LABELS[name], lr, seeds, test, validation, average, f"{_mean_seconds(s):.0f}"))
    summaries = {name: s for name, (_, s) in by_name.items()}
    for claim, better, worse in AT_SCALE_CLAIMS:
        rows.append(_comparison(claim, summaries[better], summaries[worse], metric, counts=False))
    return rows


def test_the_at_scale_tables_through_the_at_scale_specs() -> None:
    """at_scale.py's claims: at-scale-movie-reviews.yaml on movie_reviews; on movie_reviews_rating
    at-scale-movie-reviews-rating.yaml and the two ablations at AFLoRA's rate (at-scale-rating-ablations.yaml)."""
    reviews = [_spec_summaries("at-scale-movie-reviews.yaml")]
    rating = [_spec_summaries("at-scale-movie-reviews-rating.yaml"), _spec_summaries("at-scale-rating-ablations.yaml")]
    assert rating[1][1]["pm_frozen"].chosen == rating[0][1]["aflora"].chosen  # the rate borrowed is AFLoRA's
    rows = _at_scale_rows("movie_reviews", "accuracy", reviews)
    rows += _at_scale_rows("movie_reviews_rating", "pearson", rating)
    assert len(rows) == 2 * (1 + 4 + 4 + 4)
    assert _missing(rows) == []


def test_the_sweep_report_reproduces_the_encoder_front_rows() -> None:
    """benchmarks/sweeps/front-movie-reviews.yaml's report: every grid row, every front row (chosen rate, test and
    validation mean ± std, average trainable count) and the verdicts stand in RESULTS.md as front.py printed them;
    at_scale.py's two Table 2 ablations and the head-rate grid join its front from their raw runs."""
    sweep, by_name = _spec_summaries("front-movie-reviews.yaml")
    _, ablations = _spec_summaries("at-scale-movie-reviews.yaml")
    headers, grid = grid_table(sweep, list(by_name.values()))
    rows = [_row(*headers), *(_row(FRONT_LABELS[cells[0]], *cells[1:]) for cells in grid)]
    for name, s in [*by_name.items(), *((n, ablations[n]) for n in ("pm_trainable", "pm_frozen"))]:
        _, lr, seeds, test, validation, average, *_ = front_table(sweep, [s])[1][0]
        rows.append(_row(FRONT_LABELS[name], lr, lr, seeds, test, validation, average, "complete"))
    tie = "AFLoRA r=4 >= LoRA r=1 (about the same count)"
    best = "AFLoRA r=16 (best AFLoRA-family validation under LoRA r=8's count) >= LoRA r=8"
    rows.append(_comparison(tie, by_name["aflora"], by_name["lora_r1"], "accuracy"))
    rows.append(_comparison(best, by_name["aflora_r16"], by_name["lora"], "accuracy"))
    rows += _head_rate_rows(by_name["aflora"])
    front = _raw("front.jsonl")
    rows.append(_cpu_hours_row(front, "movie_reviews", "train_time_s"))
    assert len(rows) == 1 + 2 * len(by_name) + 2 + 2 + 3 + 1
    assert _missing(rows) == []


def _head_rate_rows(aflora: Summary) -> list[str]:
    """front.py's head-rate grid: AFLoRA r=4 at its chosen adapter rate with the head's rate on a ladder (chosen on
    validation with seed 0; the point at head rate = adapter rate is AFLoRA r=4's own run), seeds 1 and 2 at the
    chosen head rate. A sweep's ladder sets the adapter's rate, so this stays a recomputation of front.jsonl."""
    assert aflora.chosen is not None and aflora.chosen.lr is not None
    lr = aflora.chosen.lr
    runs = [r for r in _raw("front.jsonl") if r["method"] == "aflora_head_lr" and r["lr"] == lr]
    grid = {r["head_lr"]: r for r in runs if r["seed"] == 0} | {lr: aflora.seeds[0]}
    scores = {head: g["metrics"]["validation"]["accuracy"] for head, g in sorted(grid.items())}
    chosen = max(scores, key=lambda head: (scores[head], -head))
    seeds = [grid[chosen], *(r for r in runs if r["head_lr"] == chosen and r["seed"] != 0)]
    assert len(seeds) == 3 and len(scores) == 4

    def cell(split: str) -> str:
        return "{:.4f} ± {:.4f}".format(*mean_std([r["metrics"][split]["accuracy"] for r in seeds]))

    average = statistics.mean(r["trainable_average"] for r in seeds)
    label = "AFLoRA r=4, head rate tuned"
    return [
        _row("setting", *(f"head lr {head:g}" for head in scores), "chosen"),
        _row(label, *(f"{score:.4f}" for score in scores.values()), f"{chosen:g}"),
        _row(label, f"{lr:g}", f"{chosen:g}", "3", cell("test"), cell("validation"), f"{average:,.0f}", "complete"),
    ]


def _lm_rows(sweep: Sweep, task: str) -> list[str]:
    """front_lm.py's tables of one task through the LM spec: grids, the front (with the minutes per whole run) and
    the three verdicts, plus the task's CPU-hours."""
    by_name = _summaries(
        sweep, legacy_results.sweep_records(sweep, [RAW / "front_lm.jsonl"], lambda r: r["task"] == task)
    )
    metric = sweep.spec.selection.metric
    headers, grid = grid_table(sweep, list(by_name.values()))
    rows = [_row(*headers), *(_row(LM_LABELS[cells[0]], *cells[1:]) for cells in grid)]
    for name, lr, seeds, test, validation, average, final, *_ in front_table(sweep, list(by_name.values()))[1]:
        minutes = f"{_mean_seconds(by_name[name]) / 60:.1f}"
        rows.append(_row(LM_LABELS[name], lr, seeds, test, validation, average, final, minutes, "complete"))
    rows += [_comparison(name, by_name[a], by_name[b], metric) for name, a, b in LM_COMPARISONS]
    rows.append(_cpu_hours_row(_raw("front_lm.jsonl"), task, "wall_s"))
    assert len(rows) == 1 + 2 * len(by_name) + 3 + 1
    return rows


def test_the_sweep_report_reproduces_the_lm_front_rows() -> None:
    """benchmarks/sweeps/front-lm-bbc-headlines.yaml's report on bbc_headlines; on movie_reviews_words (the shipped
    movie-review sentences with "positive" / "negative" as the response, a data set front_lm.py generated) the same
    spec's protocol with exact match chosen on, as front_lm.py ran it."""
    sweep = load_sweep(BENCHMARKS / "sweeps" / "front-lm-bbc-headlines.yaml")
    rows = _lm_rows(sweep, "bbc_headlines")
    sweep.spec = sweep.spec.model_copy(update={"selection": Selection(split="validation", metric="exact_match")})
    rows += _lm_rows(sweep, "movie_reviews_words")
    assert _missing(rows) == []


REPLICATE_LABELS = {
    "aflora": "AFLoRA (r=4, FFN adaptive, attention frozen; score \\|grad\\|)",
    "lora": "LoRA (r=8, all linear layers)",
    "elora": "ELoRA (r=1024, vectors only)",
    "pm_trainable": "PMs trainable throughout (FFN)",
    "pm_frozen": "PMs frozen throughout",
    "both_adaptive": "PMs adaptive in FFN and attention",
    "together": "A and B of a layer frozen together",
    "score_weight_grad": "score \\|p * grad\\|",
    "score_grad_over_weight": "score \\|grad / p\\|",
}


def test_the_replicate_tables_through_the_replicate_specs() -> None:
    """replicate.py's per-method rows on both movie-review tasks, up to the FLOP columns (counted by the retired
    script, not by a sweep): seeds, validation and test mean ± std and average trainable count through the specs,
    the starting count and mean train time from the same runs."""
    lines = RESULTS.splitlines()
    for spec, task, metric in [
        ("replicate-movie-reviews.yaml", "movie_reviews", "accuracy"),
        ("replicate-movie-reviews-rating.yaml", "movie_reviews_rating", "pearson"),
    ]:
        sweep, by_name = _spec_summaries(spec)
        assert all(s.chosen is not None and s.chosen.lr is None for s in by_name.values())  # fixed rates
        section = lines[lines.index(f"#### {task} ({metric}, mean ± std over seeds)") :]
        for name, s in by_name.items():
            _, _, seeds, test, validation, average, *_ = front_table(sweep, [s])[1][0]
            start = statistics.mean(r["trainable_start"] for r in s.seeds.values())
            prefix = _row(REPLICATE_LABELS[name], seeds, validation, test, average, f"{start:,.0f}")
            prefix = f"{prefix} {_mean_seconds(s):.0f} | "
            assert next(line for line in section if line.startswith("| ")).startswith("| method |")
            assert [line for line in section[: 4 + len(by_name)] if line.startswith(prefix)], prefix


def test_the_storage_learning_table_matches_its_raw_file() -> None:
    records = read_jsonl(storage_learning.RESULTS)
    report = storage_learning.report(records)
    assert {r["storage"] for r in records} == {"fp32", "bf16", "nf4", "packed"}
    rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| setting |")]
    assert _missing(rows) == []


def test_the_faults_table_adds_up_to_its_raw_files() -> None:
    """The fault sweep's two committed runs (every phase to the SIGTERMs, then the SIGKILLs alone) are complete
    where they claim to be, and RESULTS.md's rows and total are their counts."""
    runs = [
        json.loads((RAW / name).read_text(encoding="utf-8")) for name in ("faults-partial.json", "faults-sigkill.json")
    ]
    assert runs[1]["complete"] and set(runs[1]["tried"]) == {"sigkill"}
    assert not set(runs[0]["tried"]) & set(runs[1]["tried"])
    tried = {kind: n for run in runs for kind, n in run["tried"].items()}
    survived = {kind: n for run in runs for kind, n in run["survived"].items()}
    tracebacks = sum(run["tracebacks"] for run in runs)
    section = RESULTS.split("## `benchmarks/faults.py`")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "tried" not in line]
    cells = [[cell.strip() for cell in line.strip("|").split("|")][1:] for line in rows]
    assert [int(c[0].strip("*")) for c in cells[:-1]] == list(tried.values())
    assert [int(c[1].strip("*")) for c in cells[:-1]] == list(survived.values())
    assert [int(c.strip("*")) for c in cells[-1]] == [sum(tried.values()), sum(survived.values()), tracebacks]


def test_the_idle_data_preparation_rows_match_their_raw_records() -> None:
    """The runs on the idle machine (50k rows before and after, 1M rows first and on a cache hit; both cores): each
    figure of their RESULTS.md rows is the record's, and the tokenizer-alone ceiling row spans the records' figures."""
    records = {r["label"]: r for r in read_jsonl(RAW / "data_prep.jsonl") if r["label"].endswith("idle, 2 cores")}
    before = records["before (row by row, d98b50e^), 50k rows, idle, 2 cores"]
    after = records["after, first run (cold cache), 50k rows, idle, 2 cores"]
    first_1m = records["after, first run (cold cache), 1M rows, idle, 2 cores"]
    hit_1m = records["after, cache hit, 1M rows, idle, 2 cores"]
    rows = [
        ("50k: before (row by row, `d98b50e^`'s code), idle machine, 2 cores", before),
        ("50k: first run (cold cache), idle machine, 2 cores", after),
        ("**1M: first run (cold cache), idle machine, 2 cores**", first_1m),
    ]
    for label, record in rows:
        cells = [
            f"{record['encode_cpu_s']:.1f}",
            f"{record['rows_per_cpu_s']:,} ({record['rows_per_s']:,} per wall s)",
            f"{record['process_cpu_s']:.1f}",
            f"{record['data_peak_mib']:,} MiB",
            f"{record['token_mib']:,} MiB",
        ]
        assert f"| {label} | < 2 | " + " | ".join(cells) + " |" in RESULTS
    hit = f"| {hit_1m['encode_cpu_s']:.1f} | — | {hit_1m['process_cpu_s']:.1f} | {hit_1m['data_peak_mib']} MiB"
    assert "| **1M: cache hit, idle machine, 2 cores** | < 2 " + hit + " (memory-mapped) |" in RESULTS
    idle = list(records.values())
    per_cpu = sorted(r["tokenizer_alone_rows_per_cpu_s"] for r in idle)
    per_wall = sorted(r["tokenizer_alone_rows_per_s"] for r in idle)
    ceiling = f"{per_cpu[0]:,}–{per_cpu[-1]:,} ({per_wall[0]:,}–{per_wall[-1]:,} per wall s)"
    assert f"| the tokenizer alone, idle machine, 2 cores | < 2 | — | {ceiling} |" in RESULTS
    prose = " ".join(RESULTS.split())
    speeds = f"{after['rows_per_s']:,} rows per wall second against the row-by-row code's {before['rows_per_s']:,}"
    assert speeds in prose
    assert f"encodes {first_1m['rows_per_s']:,} rows per wall second** ({first_1m['encode_s']:.0f} s, " in prose
    assert f"data is ready {hit_1m['encode_s']:.1f} s after the tokenizer" in prose
    assert f"collated {hit_1m['to_first_batch_in_process_s']:.1f} s after" in prose
    assert f"({hit_1m['wall_s']:.1f} s from the command, wall)" in prose
    timed = next(r for r in read_jsonl(RAW / "data_prep.jsonl") if r["label"].endswith("tokenizer calls timed"))
    assert f"{timed['tokenizer_calls_s']:.2f} of its {timed['encode_s']:.2f} s of encoding" in prose
