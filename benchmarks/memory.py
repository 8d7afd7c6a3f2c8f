"""Memory of training over a base stored in fp32, bf16, 8-bit and NF4: AFLoRA r=4 against PEFT LoRA r=8.

    python benchmarks/memory.py [--steps 3] [--batch 4x128] [--json benchmarks/results/memory.json]
    python benchmarks/memory.py --storages fp32 --methods aflora --steps 1 --batch 1x16   # a quick look
    python benchmarks/memory.py --model llama-300m --storages fp32,bf16 --batch 2x256 --no-timing [--checkpointing]

How it loads, adapts and measures: benchmarks/RESULTS.md, "How memory.py measures".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory_model

from common import MALLOC_ENV, SMOLLM2, json_probe, machine, offline_and_quiet, reset_peak, status_kib, write_json

MODELS = ("smollm2", "llama-300m")
STORAGES: dict[str, dict[str, Any]] = {
    "fp32": {"dtype": "fp32"},
    "bf16": {"dtype": "bf16"},
    "int8": {"dtype": "fp32", "quantization": {"bits": 8}},
    "nf4": {"dtype": "fp32", "quantization": {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "bf16"}},
}
METHODS = ("aflora", "peft_lora")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _status_kib(key: str) -> int:
    found = status_kib(key)
    if found is None:
        raise RuntimeError(f"/proc/self/status has no {key}")
    return found


def _reset_peak() -> None:
    if not reset_peak():
        raise RuntimeError("/proc/self/clear_refs: the resident peak cannot be reset (Linux only)")


def llama_300m_dir() -> Path:
    """The 374 M-parameter LLaMA, built with random weights (seed 0) and saved on first use."""
    folder = Path.home() / ".cache" / "aflora-benchmarks" / "llama-300m"
    if not (folder / "config.json").exists():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**memory_model.MODELS["llama-300m"].config())).save_pretrained(folder)
    return folder


def load_base(storage: str, checkpointing: bool = False, name: str = "smollm2") -> Any:
    """The model (`smollm2` or `llama-300m`) stored as `storage` says, loaded the way `aflora train` loads it."""
    import torch
    from transformers import AutoModelForCausalLM

    from aflora_cli.engine.base_model import model_dir
    from aflora_cli.engine.config import QuantizationConfig
    from aflora_cli.engine.storage import BaseStorage

    settings = STORAGES[storage]
    quant = settings.get("quantization")
    base = BaseStorage(settings["dtype"], QuantizationConfig(**quant) if quant else None)
    folder = model_dir(SMOLLM2) if name == "smollm2" else llama_300m_dir()
    model = base.from_pretrained(AutoModelForCausalLM, folder, torch.device("cpu"))
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def adapt(model: Any, method: str) -> Any:
    """`model` with AFLoRA r=4 (paper policy) or PEFT LoRA r=8 on the same seven linear types."""
    if method == "aflora":
        from aflora_cli import add_adapters

        add_adapters(model, {"adapter": {"rank": 4}})
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"))


def probe(storage: str, method: str, steps: int, batch: str, checkpointing: bool, name: str) -> dict[str, Any]:
    """One (storage, method) in this process: load, adapt, one warm-up step, `steps` timed steps."""
    import gc

    import torch

    rows, length = (int(part) for part in batch.split("x"))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 30_000, (rows, length), generator=generator)  # within both vocabularies
    gc.collect()
    before = _status_kib("VmRSS")
    _reset_peak()
    model = load_base(storage, checkpointing, name)
    footprint = model.get_memory_footprint()
    load_peak = _status_kib("VmHWM")
    model = adapt(model, method)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def step() -> float:
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step()
    gc.collect()
    _reset_peak()
    times = [step() for _ in range(steps)]
    steps_peak = _status_kib("VmHWM")
    return {
        "model": name,
        "storage": storage,
        "method": method,
        "checkpointing": checkpointing,
        "batch": batch,
        "footprint": footprint,
        "trainable": sum(p.numel() for p in trainable),
        "rss_before_load": before * 1024,
        "load_peak": (load_peak - before) * 1024,
        "steps_peak": (steps_peak - before) * 1024,
        "step_s": statistics.median(times),
        "step_times": times,
    }


def run_probe(
    storage: str, method: str, steps: int, batch: str, checkpointing: bool, name: str, timing: bool = True
) -> dict[str, Any] | None:
    """Memory from a process whose allocator returns freed blocks at once (so the resident size follows the
    live tensors), times from another with the allocator's defaults (the first setting slows every step)."""
    command = [sys.executable, __file__, "--probe", f"{storage}:{method}", "--steps", str(steps), "--batch", batch]
    command += ["--model", name]
    command += ["--checkpointing"] if checkpointing else []
    found = []
    envs = [{**os.environ, **MALLOC_ENV}, dict(os.environ)] if timing else [{**os.environ, **MALLOC_ENV}]
    for env in envs:
        result = json_probe(command, env, f"probe {storage}:{method}")
        if result is None:
            return None
        found.append(result)
    if not timing:  # the memory process's own times, slowed by its allocator setting: not reported
        return found[0] | {"step_s": None, "step_times": None}
    return found[0] | {"step_s": found[1]["step_s"], "step_times": found[1]["step_times"]}


def report(records: list[dict[str, Any]]) -> str:
    """A markdown table: per storage, both methods' footprint, peaks and step time, and AFLoRA/PEFT ratios."""
    mib = 2**20
    by = {(r["storage"], r["method"], r["checkpointing"]): r for r in records}
    lines = [
        "| base | grad ckpt | footprint (MiB) | load peak A / P (MiB) | steps peak A / P (MiB) | "
        "peak A/P | step A / P (s) | trainable A / P |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (storage, method, ckpt), rec in by.items():
        if method != "aflora" or (storage, "peft_lora", ckpt) not in by:
            continue
        peft = by[(storage, "peft_lora", ckpt)]
        lines.append(
            f"| {storage} | {'yes' if ckpt else 'no'} | {rec['footprint'] / mib:.0f} | "
            f"{rec['load_peak'] / mib:.0f} / {peft['load_peak'] / mib:.0f} | "
            f"{rec['steps_peak'] / mib:.0f} / {peft['steps_peak'] / mib:.0f} | "
            f"{rec['steps_peak'] / peft['steps_peak']:.2f} | {_seconds(rec)} / {_seconds(peft)} | "
            f"{rec['trainable']:,} / {peft['trainable']:,} |"
        )
    return "\n".join(lines)


def _seconds(record: dict[str, Any]) -> str:
    return "—" if record["step_s"] is None else f"{record['step_s']:.2f}"


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
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    offline_and_quiet()
    if args.probe:
        storage, method = args.probe.split(":")
        print(json.dumps(probe(storage, method, args.steps, args.batch, args.checkpointing, args.model)))
        return 0
    records = []
    for storage in args.storages.split(","):
        for method in args.methods.split(","):
            timing = not args.no_timing
            record = run_probe(storage, method, args.steps, args.batch, args.checkpointing, args.model, timing)
            if record is not None:
                records.append(record)
                print(json.dumps({k: v for k, v in record.items() if k != "step_times"}), flush=True)
    print(report(records))
    if args.json:
        existing = json.loads(args.json.read_text()) if args.json.exists() else {"runs": []}
        existing["machine"] = machine()
        existing["runs"] = [
            r
            for r in existing["runs"]
            if (r.get("model", "smollm2"), r["storage"], r["method"], r["checkpointing"], r["batch"])
            not in {(n["model"], n["storage"], n["method"], n["checkpointing"], n["batch"]) for n in records}
        ]
        existing["runs"] += records
        write_json(args.json, existing, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
