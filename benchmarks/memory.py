"""Memory of training over a base stored in fp32, bf16, 8-bit and NF4: AFLoRA r=4 against PEFT LoRA r=8.

    python benchmarks/memory.py [--steps 3] [--batch 4x128] [--json benchmarks/results/memory.json]
    python benchmarks/memory.py --storages fp32 --methods aflora --steps 1 --batch 1x16   # a quick look
    python benchmarks/memory.py --model llama-300m --storages fp32,bf16 --batch 2x256 --no-timing [--checkpointing]

How it loads, adapts and measures: benchmarks/RESULTS.md, "How memory.py measures".
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import common

MODELS = ("smollm2", "llama-300m")
STORAGES: dict[str, dict[str, Any]] = {
    "fp32": {"dtype": "fp32"},
    "bf16": {"dtype": "bf16"},
    "int8": {"dtype": "fp32", "quantization": {"bits": 8}},
    "nf4": {"dtype": "fp32", "quantization": {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "bf16"}},
}
METHODS = ("aflora", "peft_lora")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapt(model: Any, method: str) -> Any:
    """`model` with AFLoRA r=4 (paper policy) or PEFT LoRA r=8 on the same seven linear types."""
    if method == "aflora":
        from aflora_cli import add_adapters

        add_adapters(model, {"adapter": {"rank": 4}})
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"))


def probe(storage: str, method: str, steps: int, batch: str, checkpointing: bool, model: str) -> dict[str, Any]:
    """One (storage, method) in this process: load, adapt, one warm-up step, `steps` timed steps."""
    import torch

    common.offline_and_quiet()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 30_000, common.parse_batch(batch), generator=generator)  # within both vocabularies
    resident = common.Resident()
    base = common.load_causal_lm(model, **STORAGES[storage])
    base.config.use_cache = False
    if checkpointing:
        from aflora_cli.training.trainer import enable_activation_checkpointing

        enable_activation_checkpointing(base)
    footprint, load_peak = base.get_memory_footprint(), resident.peak()
    adapted = adapt(base, method)
    adapted.train()
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def step() -> float:
        start = time.perf_counter()
        adapted(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step()
    resident.reset()
    times = [step() for _ in range(steps)]
    return {
        "model": model,
        "storage": storage,
        "method": method,
        "checkpointing": checkpointing,
        "batch": batch,
        "footprint": footprint,
        "trainable": sum(p.numel() for p in trainable),
        "rss_before_load": resident.baseline * 1024,
        "load_peak": load_peak,
        "steps_peak": resident.peak(),
        "step_s": statistics.median(times),
        "step_times": times,
    }


def run_probe(timing: bool, **settings: Any) -> dict[str, Any] | None:
    """Memory from a fresh process whose allocator returns freed blocks at once (so the resident size follows
    the live tensors); times from another with the allocator's defaults (the first setting slows every step),
    or none (`timing` off: the memory process's own times are not reported)."""
    memory = common.in_fresh_process("memory", "probe", {**common.OFFLINE, **common.MALLOC_ENV}, **settings)
    times = common.in_fresh_process("memory", "probe", **settings) if memory and timing else {"step_s": None}
    if memory is None or times is None:
        return None
    return memory | {"step_s": times["step_s"], "step_times": times.get("step_times")}


def report(records: list[dict[str, Any]]) -> str:
    """A markdown table: per storage, both methods' footprint, peaks and step time, and AFLoRA/PEFT ratios."""
    by = {(r["storage"], r["method"], r["checkpointing"]): r for r in records}
    lines = [
        "| base | grad ckpt | footprint (MiB) | load peak A / P (MiB) | steps peak A / P (MiB) | "
        "peak A/P | step A / P (s) | trainable A / P |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (storage, method, ckpt), a in by.items():
        if method != "aflora" or (storage, "peft_lora", ckpt) not in by:
            continue
        p = by[(storage, "peft_lora", ckpt)]
        both = {key: f"{a[key] / common.MIB:.0f} / {p[key] / common.MIB:.0f}" for key in ("load_peak", "steps_peak")}
        seconds = " / ".join("—" if r["step_s"] is None else f"{r['step_s']:.2f}" for r in (a, p))
        ratio = f"{a['steps_peak'] / p['steps_peak']:.2f}"
        trainable = f"{a['trainable']:,} / {p['trainable']:,}"
        footprint = f"{a['footprint'] / common.MIB:.0f}"
        lines.append(common.row(storage, "yes" if ckpt else "no", footprint, *both.values(), ratio, seconds, trainable))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="smollm2")
    parser.add_argument("--storages", default=",".join(STORAGES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", default="4x128", help="ROWSxTOKENS")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    parser.add_argument("--no-timing", action="store_true", help="memory only (no second process per probe)")
    parser.add_argument("--json", type=Path, help="write the records here")
    args = parser.parse_args(argv)
    records = []
    for storage in args.storages.split(","):
        for method in args.methods.split(","):
            settings = {"steps": args.steps, "batch": args.batch, "checkpointing": args.checkpointing}
            record = run_probe(not args.no_timing, storage=storage, method=method, model=args.model, **settings)
            if record is not None:
                records.append(record)
                print(json.dumps({k: v for k, v in record.items() if k != "step_times"}), flush=True)
    print(report(records))
    if args.json:  # a new record replaces an old one of the same settings
        existing = json.loads(args.json.read_text()) if args.json.exists() else {"runs": []}
        key = ("model", "storage", "method", "checkpointing", "batch")
        new = {tuple(r[k] for k in key) for r in records}
        kept = [r for r in existing["runs"] if tuple(r.get(k, "smollm2") for k in key) not in new]
        common.write_json(args.json, {**existing, "machine": common.machine(), "runs": kept + records}, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
