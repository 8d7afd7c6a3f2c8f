"""Per-process memory and step time of two-process FSDP (`training.fsdp`) against two-process DDP, on the CPU.

    python benchmarks/fsdp_memory.py [--model llama-300m] [--storage fp32] [--batch 2x256] [--steps 2]
                                     [--json benchmarks/results/fsdp_memory.json]
    python benchmarks/fsdp_memory.py --model llama-small --batch 2x64 --steps 2   # a quick look

Each mode (ddp, fsdp) is one `torchrun --nproc-per-node 2` of this file in worker mode (gloo). Each rank loads the
base the way `aflora train` does (`from_pretrained` with aflora's storage settings, on the CPU), adds AFLoRA r=4
adapters (the paper's policy: FFN PMs trainable, none freezing during the run, so the trainable set is at its
largest) and, under FSDP, shards it with aflora's own `training/sharding.py` (`fully_shard` per decoder block,
then the root; adapters whole). Then aflora's `TrainingStep` (forward, backward, the gradient averaging of DDP or
of the sharded path, freezer scores, AdamW) runs on random token batches: one warm-up step, then `--steps` timed.

Models: `llama-300m` is the 374 M-parameter LLaMA of `memory.py` (random weights, saved once under
`~/.cache/aflora-benchmarks/`); `llama-small` a 4-block LLaMA of 45 M parameters (two thirds of them embeddings
and output layer) built the same way, for a quick look. The loaded weights are copied into the process's own
memory (as a copy to a GPU would be) rather than left as pages of the mapped safetensors file, which the resident
size counts only once touched.

Figures per rank: `param_bytes`, what the rank's parameters store (its shards under FSDP); from Linux
`/proc/self/status`, in processes whose allocator returns freed blocks at once, `load_peak` (VmHWM while loading,
adapting and sharding), `rss_after_setup` (VmRSS after that), `steps_peak` (VmHWM during the timed steps, reset
after the warm-up step), all above `rss_before_load`; `step_s`, the median step time. Times come from the same
processes (the allocator setting slows steps a little, alike for both modes); two ranks on a shared 2-core
machine make them say little.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory
import memory_model

from common import machine, offline_and_quiet

MODES = ("ddp", "fsdp")
SMALL = {
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
}


def _model_dir(name: str) -> Path:
    if name == "llama-300m":
        return memory.llama_300m_dir()
    folder = Path.home() / ".cache" / "aflora-benchmarks" / name
    if not (folder / "config.json").exists():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = {**memory_model.MODELS["llama-300m"].config(), **SMALL}
        LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(folder)
    return folder


def _local(param: Any) -> Any:
    """The part of a parameter this rank stores: its shard if FSDP sharded it."""
    return param.to_local() if hasattr(param, "to_local") else param


def worker(mode: str, name: str, storage: str, batch: str, steps: int, out: Path) -> None:
    """One rank of one mode under torchrun: set up, warm up, time `steps` steps, write this rank's figures."""
    import torch
    from transformers import AutoModelForCausalLM

    from aflora_cli import add_adapters
    from aflora_cli.engine.checkpoint import adapter_parameters
    from aflora_cli.engine.freezing import Freezer
    from aflora_cli.engine.inject import adaptive_matrices
    from aflora_cli.engine.storage import BaseStorage
    from aflora_cli.recipe import FsdpConfig, TrainingConfig
    from aflora_cli.training import distributed, sharding
    from aflora_cli.training.step import TrainingStep, build_optimizer, linear_schedule

    group = distributed.setup("cpu")
    rows, length = (int(part) for part in batch.split("x"))
    ids = torch.randint(100, 30_000, (rows, length), generator=torch.Generator().manual_seed(group.rank))
    gc.collect()
    before = memory._status_kib("VmRSS")
    memory._reset_peak()
    model = BaseStorage(storage).from_pretrained(AutoModelForCausalLM, _model_dir(name), torch.device("cpu"))
    model.config.use_cache = False
    with torch.no_grad():  # weights in the process's own memory, as a GPU copy would be, not pages of the file
        for param in model.parameters():
            param.data = param.data.clone()
    adapters = add_adapters(model, {"adapter": {"rank": 4}})
    if mode == "fsdp":
        sharding.shard(model, adapter_parameters(model, []).values(), FsdpConfig(), group)
    model.train()
    gc.collect()
    load_peak, after_setup = memory._status_kib("VmHWM"), memory._status_kib("VmRSS")
    freezer = Freezer(adaptive_matrices(model, adapters.targets), total_steps=10**9, t_i=10**9, t_f=0)
    optimizer = build_optimizer(model, [], TrainingConfig(lr=1e-4, warmup_ratio=0.0))
    training = TrainingStep(
        model,
        freezer,
        optimizer,
        linear_schedule(optimizer, 0, 10**6),
        torch.amp.GradScaler("cpu", enabled=False),
        group,
        sharded=mode == "fsdp",
    )

    def step(index: int) -> float:
        group.barrier()
        start = time.perf_counter()
        loss = training.forward_backward([{"input_ids": ids, "labels": ids}])
        training.optimizer_step(loss, index)
        return time.perf_counter() - start

    step(0)
    gc.collect()
    memory._reset_peak()
    times = [step(index) for index in range(1, steps + 1)]
    steps_peak = memory._status_kib("VmHWM")
    record = {
        "mode": mode,
        "rank": group.rank,
        "model": name,
        "storage": storage,
        "batch": batch,
        "base_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n and "lambda_" not in n),
        "param_bytes": sum(_local(p).numel() * p.element_size() for p in model.parameters()),
        "rss_before_load": before * 1024,
        "load_peak": (load_peak - before) * 1024,
        "rss_after_setup": (after_setup - before) * 1024,
        "steps_peak": (steps_peak - before) * 1024,
        "step_s": statistics.median(times),
        "step_times": times,
    }
    (out / f"{mode}-rank{group.rank}.json").write_text(json.dumps(record), encoding="utf-8")
    distributed.teardown()


def launch(mode: str, args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    """One mode as two processes under torchrun; the two ranks' records."""
    env = {**os.environ, **memory.MALLOC_ENV, "OMP_NUM_THREADS": "1"}
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
    mib = 2**20
    worst = {mode: {key: max(r[key] for r in records if r["mode"] == mode) for key in KEYS} for mode in MODES}
    lines = ["| figure (largest rank) | DDP | FSDP | FSDP / DDP |", "|---|---|---|---|"]
    for key in KEYS:
        ddp, fsdp = worst["ddp"][key], worst["fsdp"][key]
        unit, scale = ("s", 1.0) if key == "step_s" else ("MiB", mib)
        lines.append(f"| {key} ({unit}) | {ddp / scale:.2f} | {fsdp / scale:.2f} | {fsdp / ddp:.3f} |")
    return "\n".join(lines)


KEYS = ("param_bytes", "load_peak", "rss_after_setup", "steps_peak", "step_s")


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
    offline_and_quiet()
    if args.worker:
        worker(args.worker, args.model, args.storage, args.batch, args.steps, args.out)
        return
    import tempfile

    _model_dir(args.model)  # built once, before two processes would race to build it
    with tempfile.TemporaryDirectory() as folder:
        records = [record for mode in MODES for record in launch(mode, args, Path(folder))]
    print(report(records))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {"model": args.model, "storage": args.storage, "batch": args.batch, "steps": args.steps}
        payload = {"machine": machine(), "settings": settings, "records": records}
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
