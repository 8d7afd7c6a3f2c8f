"""Start-up of `aflora train` and the time of the light commands, as whole processes.

    python benchmarks/startup.py [--runs 5] [--json FILE]

- train: process start -> end of the first optimizer step of `recipes/quickstart.yaml` (read from the moment
  the run's metrics.jsonl first appears, with `training.log_every=1`; the process is stopped then);
- inspect: `aflora inspect` of a checkpoint the script trains first (2 steps);
- help: `aflora --help`.
aflora_cli's bytecode is compiled first (see `compile_bytecode`). Each figure is the median of `--runs` runs.
Run it on a quiet machine; issue 11's targets are train <= 5 s and inspect <= 1.5 s on 2 cores.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import OFFLINE, QUICKSTART, compile_bytecode, timed, train_command, write_json

AFLORA = [sys.executable, "-m", "aflora_cli"]


def until_first_step(folder: Path) -> float:
    """Seconds from process start until the first step's record is written."""
    log = folder / "metrics.jsonl"
    start = time.perf_counter()
    command = train_command(QUICKSTART, folder, "training.log_every=1")
    process = subprocess.Popen(command, env=OFFLINE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (log.exists() and log.stat().st_size > 0):
            if process.poll() is not None:
                raise SystemExit(f"aflora train ended ({process.returncode}) before its first step")
            time.sleep(0.02)
        return time.perf_counter() - start
    finally:
        process.kill()
        process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    compile_bytecode()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint_run = work / "checkpoint"
        timed(train_command(QUICKSTART, checkpoint_run, "training.max_steps=2"), stderr=None)
        times: dict[str, list[float]] = {"train_first_step": [], "inspect": [], "help": []}
        for run in range(args.runs):
            times["train_first_step"].append(until_first_step(work / f"run{run}"))
            times["inspect"].append(timed([*AFLORA, "inspect", str(checkpoint_run / "last")]))
            times["help"].append(timed([*AFLORA, "--help"]))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name:18s} median {value:6.2f} s   runs: {', '.join(f'{v:.2f}' for v in times[name])}")
    if args.json:
        write_json(args.json, {"runs": times, "median_s": medians})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
