"""Does AFLoRA still learn over a base stored in bf16 or NF4? The LM quickstart, per base storage and seed.

    python benchmarks/storage_learning.py                                  # fp32, bf16, nf4 x seeds 42, 1, 2
    python benchmarks/storage_learning.py --storages bf16 --seeds 1

Each run is `aflora train recipes/quickstart-lm.yaml` (SmolLM2-135M-Instruct, BBC News headlines, 60 steps,
ROUGE-L on 100 held-out stories before training and after) with `--set seed=…` and the base stored as named:
`bf16` sets `model.dtype=bf16`, `nf4` sets `model.quantization={bits: 4}` (NF4, double quantization, bf16
compute, the rest of the model fp32). The record keeps the run's own printed before / after / paired gain with
its 95 % interval over the same 100 stories, and the wall time. Runs already in the results file are skipped,
so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "storage_learning.jsonl"
STORAGES = {"fp32": [], "bf16": ["model.dtype=bf16"], "nf4": ["model.quantization={bits: 4}"]}
GAIN = re.compile(
    r"validation rougeL: ([\d.]+) before training, ([\d.]+) after \(gain ([+-][\d.]+) ± ([\d.]+), 95 % interval"
)


def run(storage: str, seed: int) -> dict[str, Any]:
    """One quickstart-lm run; its printed ROUGE-L line, parsed."""
    with tempfile.TemporaryDirectory() as out:
        overrides = [f"seed={seed}", f"output_dir={out}", *STORAGES[storage]]
        command = [str(Path(sys.executable).parent / "aflora"), "train", str(ROOT / "recipes" / "quickstart-lm.yaml")]
        for assignment in overrides:
            command += ["--set", assignment]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "400"}
        result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    found = GAIN.search(" ".join(result.stdout.split()))
    if result.returncode != 0 or found is None:
        raise RuntimeError(f"{storage} seed {seed} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    before, after, gain, interval = (float(value) for value in found.groups())
    return {"storage": storage, "seed": seed, "before": before, "after": after, "gain": gain, "interval": interval}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storages", default=",".join(STORAGES))
    parser.add_argument("--seeds", default="42,1,2")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    done = set()
    if args.results.exists():
        done = {(r["storage"], r["seed"]) for r in map(json.loads, args.results.read_text().splitlines())}
    for seed in (int(s) for s in args.seeds.split(",")):
        for storage in args.storages.split(","):
            if (storage, seed) in done:
                continue
            started = time.perf_counter()
            record = run(storage, seed) | {"seconds": round(time.perf_counter() - started), "machine": machine()}
            with args.results.open("a", encoding="utf-8") as sink:
                sink.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
