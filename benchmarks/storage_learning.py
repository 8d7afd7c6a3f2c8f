"""Does AFLoRA still learn over a base stored in bf16 or NF4? The LM quickstart, per base storage and seed.

    python benchmarks/storage_learning.py                                  # fp32, bf16, nf4 x seeds 42, 1, 2
    python benchmarks/storage_learning.py --storages bf16 --seeds 1
    python benchmarks/storage_learning.py --storages packed                # fp32 with training.packing (issue 33)
    python benchmarks/storage_learning.py --report                         # the table from the raw results

Each run is `aflora train recipes/quickstart-lm.yaml --set seed=…` over the base stored as named (STORAGES;
`packed` is the fp32 base with `training.packing=true`); its record keeps the ROUGE-L gain the run prints. Runs
already in the results file are skipped. Details: RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from common import OFFLINE, ROOT, append_jsonl, machine, read_jsonl, train_command

RESULTS = ROOT / "benchmarks" / "results" / "storage_learning.jsonl"
# the base's storage, and (issue 33) the fp32 base with its rows packed: the same rows per micro-batch, packed
STORAGES = {"fp32": [], "bf16": ["model.dtype=bf16"], "nf4": ["model.quantization={bits: 4}"]}
STORAGES["packed"] = ["training.packing=true"]
GAIN = re.compile(
    r"validation rougeL: ([\d.]+) before training, ([\d.]+) after \(gain ([+-][\d.]+) ± ([\d.]+), 95 % interval"
)


def run(storage: str, seed: int) -> dict[str, Any]:
    """One quickstart-lm run; its printed ROUGE-L line, parsed."""
    with tempfile.TemporaryDirectory() as out:
        command = train_command(ROOT / "recipes" / "quickstart-lm.yaml", out, f"seed={seed}", *STORAGES[storage])
        result = subprocess.run(command, capture_output=True, text=True, env={**OFFLINE, "COLUMNS": "400"}, check=False)
    found = GAIN.search(" ".join(result.stdout.split()))
    if result.returncode != 0 or found is None:
        raise RuntimeError(f"{storage} seed {seed} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    before, after, gain, interval = (float(value) for value in found.groups())
    return {"storage": storage, "seed": seed, "before": before, "after": after, "gain": gain, "interval": interval}


def report(records: list[dict[str, Any]]) -> str:
    """Markdown: each storage's runs by seed (ROUGE-L before → after, paired gain ± its 95 % interval) and the
    mean gain ± std over its seeds."""
    lines = [
        "| base | seeds | ROUGE-L before → after, gain ± 95 % interval, per seed | mean gain ± std | minutes per run |",
        "|---|---:|---|---:|---:|",
    ]
    for storage in STORAGES:
        runs = sorted((r for r in records if r["storage"] == storage), key=lambda r: r["seed"])
        if not runs:
            continue
        gains = [r["gain"] for r in runs]
        spread = f" ± {statistics.stdev(gains):.4f}" if len(gains) > 1 else ""
        per_seed = "; ".join(
            f"seed {r['seed']}: {r['before']:.4f} → {r['after']:.4f}, {r['gain']:+.4f} ± {r['interval']:.4f}"
            for r in runs
        )
        minutes = statistics.mean(r["seconds"] for r in runs) / 60
        lines.append(
            f"| {storage} | {len(runs)} | {per_seed} | {statistics.mean(gains):+.4f}{spread} | {minutes:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storages", default="fp32,bf16,nf4")
    parser.add_argument("--seeds", default="42,1,2")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--report", action="store_true", help="only print the table from the results file")
    args = parser.parse_args(argv)
    if args.report:
        print(report(read_jsonl(args.results)))
        return 0
    done = {(r["storage"], r["seed"]) for r in read_jsonl(args.results)}
    for seed in (int(s) for s in args.seeds.split(",")):
        for storage in args.storages.split(","):
            if (storage, seed) in done:
                continue
            started = time.perf_counter()
            record = run(storage, seed) | {"seconds": round(time.perf_counter() - started), "machine": machine()}
            append_jsonl(args.results, record)
            print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
