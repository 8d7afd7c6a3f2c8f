"""Per-process memory and step time of two-process FSDP (`training.fsdp`) against two-process DDP, on the CPU.

    python benchmarks/fsdp_memory.py [--model llama-300m] [--storage fp32] [--batch 2x256] [--steps 2]
                                     [--json benchmarks/results/fsdp_memory.json]
    python benchmarks/fsdp_memory.py --model llama-small --batch 2x64 --steps 2   # a quick look

Each mode is one `torchrun --nproc-per-node 2` of this file in worker mode (gloo): each rank loads the base as
`aflora train` does (its weights copied into process memory, as to a GPU), adds AFLoRA r=4 (nothing freezing: the
trainable set at its largest), shards it with aflora's `training/sharding.py` under FSDP, then runs aflora's
`TrainingStep` on random tokens: one warm-up step, `--steps` timed. `llama-small` is a 45 M-parameter LLaMA of 4
blocks. Per rank, in processes whose allocator returns freed blocks at once, above `rss_before_load`: `load_peak`
(VmHWM while loading, adapting, sharding), `rss_after_setup`, `steps_peak` (VmHWM over the timed steps);
`param_bytes`, what the rank's parameters store (its shard under FSDP); `step_s`, the median step time (two ranks
on 2 shared cores: it says little). Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

MODES = ("ddp", "fsdp")
KEYS = ("param_bytes", "load_peak", "rss_after_setup", "steps_peak", "step_s")


def worker(mode: str, name: str, storage: str, batch: str, steps: int, out: Path) -> None:
    """One rank of one mode under torchrun: set up, warm up, time `steps` steps, write this rank's figures."""
    import gc

    import torch

    from aflora_cli import add_adapters
    from aflora_cli.engine.checkpoint import adapter_parameters
    from aflora_cli.engine.freezing import Freezer
    from aflora_cli.engine.inject import adaptive_matrices
    from aflora_cli.recipe import FsdpConfig
    from aflora_cli.training import distributed, sharding

    group = distributed.setup("cpu")
    ids = torch.randint(100, 30_000, common.parse_batch(batch), generator=torch.Generator().manual_seed(group.rank))
    resident = common.Resident()
    model = common.load_causal_lm(name, storage)
    model.config.use_cache = False
    with torch.no_grad():  # weights in the process's own memory, as a GPU copy would be, not pages of the file
        for param in model.parameters():
            param.data = param.data.clone()
    adapters = add_adapters(model, {"adapter": {"rank": 4}})
    if mode == "fsdp":
        sharding.shard(model, adapter_parameters(model, []).values(), FsdpConfig(), group)
    model.train()
    gc.collect()
    load_peak, after_setup = resident.peak(), resident.now()
    freezer = Freezer(adaptive_matrices(model, adapters.targets), total_steps=10**9, t_i=10**9, t_f=0)
    training = common.training_step(model, [], freezer, 1e-4, group, sharded=mode == "fsdp")

    def step(index: int) -> float:
        group.barrier()
        start = time.perf_counter()
        training.optimizer_step(training.forward_backward([{"input_ids": ids, "labels": ids}]), index)
        return time.perf_counter() - start

    step(0)
    resident.reset()
    times = [step(index) for index in range(1, steps + 1)]
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]  # a shard under FSDP
    record = {
        "mode": mode,
        "rank": group.rank,
        "model": name,
        "storage": storage,
        "batch": batch,
        "base_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n and "lambda_" not in n),
        "param_bytes": sum(p.numel() * p.element_size() for p in local),
        "rss_before_load": resident.baseline * 1024,
        "load_peak": load_peak,
        "rss_after_setup": after_setup,
        "steps_peak": resident.peak(),
        "step_s": statistics.median(times),
        "step_times": times,
    }
    (out / f"{mode}-rank{group.rank}.json").write_text(json.dumps(record), encoding="utf-8")
    distributed.teardown()


def launch(mode: str, args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    """One mode as two processes under torchrun; the two ranks' records."""
    env = {**os.environ, **common.MALLOC_ENV, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(args.port)]
    command += [__file__, "--worker", mode, "--model", args.model, "--storage", args.storage]
    command += ["--batch", args.batch, "--steps", str(args.steps), "--out", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{result.stderr[-3000:]}")
    return [json.loads((out / f"{mode}-rank{rank}.json").read_text(encoding="utf-8")) for rank in (0, 1)]


def report(records: list[dict[str, Any]]) -> str:
    """A markdown table: each mode's per-rank figures (the larger of the two ranks), and FSDP / DDP ratios."""
    worst = {mode: {key: max(r[key] for r in records if r["mode"] == mode) for key in KEYS} for mode in MODES}
    lines = ["| figure (largest rank) | DDP | FSDP | FSDP / DDP |", "|---|---|---|---|"]
    for key in KEYS:
        ddp, fsdp = worst["ddp"][key], worst["fsdp"][key]
        unit, scale = ("s", 1) if key == "step_s" else ("MiB", common.MIB)
        lines.append(common.row(f"{key} ({unit})", f"{ddp / scale:.2f}", f"{fsdp / scale:.2f}", f"{fsdp / ddp:.3f}"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("llama-300m", "llama-small"), default="llama-300m")
    parser.add_argument("--storage", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--batch", default="2x256", help="rows x tokens per process")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--port", type=int, default=29531)
    parser.add_argument("--json", type=Path, help="write the raw records here")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    common.offline_and_quiet()
    if args.worker:
        worker(args.worker, args.model, args.storage, args.batch, args.steps, args.out)
        return
    common.llama_dir(args.model)  # built once, before two processes would race to build it
    with tempfile.TemporaryDirectory() as folder:
        records = [record for mode in MODES for record in launch(mode, args, Path(folder))]
    print(report(records))
    if args.json:
        settings = {"model": args.model, "storage": args.storage, "batch": args.batch, "steps": args.steps}
        common.write_json(args.json, {"machine": common.machine(), "settings": settings, "records": records})


if __name__ == "__main__":
    main()
