"""Data preparation of a large instruction file: rows per second on a first run, start time on a cache hit, and
the memory the encoded data takes.

    python benchmarks/data_prep.py build --rows 1000000 --out /tmp/aflora-bench/alpaca-1m.jsonl
    python benchmarks/data_prep.py measure --file /tmp/aflora-bench/alpaca-1m.jsonl --label after-first \\
        --cache /tmp/aflora-bench/cache
    python benchmarks/data_prep.py measure ... --label after-hit     # the same again: a cache hit
    git archive main aflora_cli | tar -x -C /tmp/aflora-main         # the code before (row by row, no cache)
    python benchmarks/data_prep.py measure --file /tmp/aflora-bench/alpaca-50k.jsonl --label before \\
        --code /tmp/aflora-main

What `build` writes and `measure` records: benchmarks/RESULTS.md, "How data_prep.py builds and measures".
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

import common

RESULTS = common.ROOT / "benchmarks" / "results" / "data_prep.jsonl"
INSTRUCTIONS = (
    "Read the movie review below and say whether it is positive or negative, then rate it from -4 to 4.",
    "Classify the sentiment of this film review and explain your answer in a few sentences.",
    "Write a short critique that agrees with the review, and give it a rating.",
    "Summarize what the reviewer thinks of the movie and how strongly they feel.",
)


def build(rows: int, out: Path, seed: int = 0) -> None:
    with (common.MOVIE_REVIEWS / "train.tsv").open(encoding="utf-8", newline="") as handle:
        reviews = [(r["sentence"], float(r["rating"])) for r in csv.DictReader(handle, delimiter="\t")]
    rng = random.Random(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for i in range(rows):
            sentence, rating = reviews[i % len(reviews)]
            more = " ".join(rng.choice(reviews)[0] for _ in range(rng.randint(2, 5)))
            verdict = "positive" if rating > 0 else "negative"
            record = {
                "instruction": INSTRUCTIONS[i % len(INSTRUCTIONS)],
                "input": "" if i % 3 == 0 else sentence,
                "output": f"The review is {verdict}. {more} Rating: {rating:.1f}.",
            }
            handle.write(json.dumps(record) + "\n")
    print(f"{out}: {rows:,} rows, {out.stat().st_size / 1e6:.0f} MB")


def child(file: str, max_length: int, start: float) -> dict[str, Any]:
    """One process as `aflora train` starts: tokenizer, task, every split encoded, the first batch collated
    (`start`: perf_counter when the process began running Python)."""
    from aflora_cli.adapted.building import load_base, task_for
    from aflora_cli.tasks import causal_lm

    in_tokenizer = [0.0]  # wall seconds inside the task's batched tokenizer calls (this checkout's code only)
    if hasattr(causal_lm, "_token_ids"):
        calls = causal_lm._token_ids

        def timed_calls(*args: Any) -> Any:
            started = time.perf_counter()
            ids = calls(*args)
            in_tokenizer[0] += time.perf_counter() - started
            return ids

        causal_lm._token_ids = timed_calls
    recipe = common.instruction_recipe(
        file, "/tmp/unused", training={"max_steps": 100, "batch_size": 8, "max_length": max_length}
    )
    base = load_base(recipe)
    task = task_for(recipe, base)
    tokenizer_ready, rss_before, cpu_before = time.perf_counter(), common.status_kib("VmRSS") or 0, common.cpu_seconds()
    data = task.load_splits(base.tokenizer)
    encoded, cpu_encoding = time.perf_counter(), common.cpu_seconds() - cpu_before
    train = data.train
    assert train is not None
    batch = task.collate(base.tokenizer)([train[i] for i in range(8)])
    first_batch = time.perf_counter()
    if hasattr(train, "token_bytes"):
        token_bytes = train.token_bytes()
    else:  # the code before: a list of dicts of numpy arrays
        token_bytes = sum(row[k].nbytes for row in train for k in ("input_ids", "labels", "prompt_ids"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ceiling = _tokenizer_alone(base.tokenizer, file)
    return {
        "rows": len(train),
        "skipped": data.skipped.get("train", 0),
        "tokens": int(sum(task.lengths(train))),
        "encode_s": round(encoded - tokenizer_ready, 2),
        "tokenizer_calls_s": round(in_tokenizer[0], 2) if in_tokenizer[0] else None,
        "rows_per_s": round(len(train) / max(encoded - tokenizer_ready, 1e-9)),
        "encode_cpu_s": round(cpu_encoding, 2),
        "rows_per_cpu_s": round(len(train) / max(cpu_encoding, 1e-9)),
        "process_cpu_s": round(common.cpu_seconds(), 2),
        "tokenizer_ready_s": round(tokenizer_ready - start, 2),
        "to_first_batch_in_process_s": round(first_batch - start, 2),
        "first_batch_shape": list(batch["input_ids"].shape),
        "peak_rss_mib": round(peak / 1024),
        "data_peak_mib": round((peak - rss_before) / 1024),
        "token_mib": round(token_bytes / 2**20),
        **ceiling,
    }


def _tokenizer_alone(tokenizer: Any, file: str, rows: int = 20_000) -> dict[str, float]:
    """The ceiling: the fast tokenizer alone, in one batch call, on the text fields of the file's first rows
    (after everything else, so it adds nothing to the figures above)."""
    with open(file, encoding="utf-8") as handle:
        texts = [
            " ".join((record["instruction"], record["input"], record["output"]))
            for record in (json.loads(line) for _, line in zip(range(rows), handle))
        ]
    started, cpu = time.perf_counter(), common.cpu_seconds()
    tokenizer.backend_tokenizer.encode_batch(texts)
    wall, cpu_used = time.perf_counter() - started, common.cpu_seconds() - cpu
    return {
        "tokenizer_alone_rows_per_s": round(len(texts) / wall),
        "tokenizer_alone_rows_per_cpu_s": round(len(texts) / cpu_used),
    }


def measure(file: Path, label: str, cache: Path | None, code: Path | None, max_length: int) -> None:
    """`child` in a fresh process, on this checkout's aflora_cli or on `code`'s; its record appended to RESULTS."""
    env = {**common.OFFLINE, "PYTHONPATH": os.pathsep.join(str(p) for p in (code or common.ROOT, common.BENCHMARKS))}
    if cache is not None:
        env["AFLORA_CACHE_DIR"] = str(cache)
    started = time.perf_counter()
    result = common.json_probe(
        [sys.executable, "-c", CHILD, str(file), str(max_length)], env, "measure", cwd=code or common.ROOT
    )
    if result is None:
        raise SystemExit(1)
    record = {"label": label, "file": str(file), "code": str(code or "this checkout")}
    record |= {"wall_s": round(time.perf_counter() - started, 2), **result}
    common.append_jsonl(RESULTS, record)
    print(json.dumps(record))


CHILD = (
    "import json, sys, time; start = time.perf_counter(); import data_prep; "
    "print(json.dumps(data_prep.child(sys.argv[1], int(sys.argv[2]), start)))"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("build")
    make.add_argument("--rows", type=int, default=1_000_000)
    make.add_argument("--out", type=Path, required=True)
    run = commands.add_parser("measure")
    run.add_argument("--file", type=Path, required=True)
    run.add_argument("--label", required=True)
    run.add_argument("--cache", type=Path, help="AFLORA_CACHE_DIR for the run (default: the user's cache)")
    run.add_argument("--code", type=Path, help="a checkout whose aflora_cli to measure (default: this one)")
    run.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()
    if args.command == "build":
        build(args.rows, args.out)
    else:
        measure(args.file, args.label, args.cache, args.code, args.max_length)


if __name__ == "__main__":
    main()
