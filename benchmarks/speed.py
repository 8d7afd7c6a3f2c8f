"""Training-step speed and peak memory: AFLoRA against LoRA, ELoRA, PEFT's LoRA and VeRA, and the floor.

    python benchmarks/speed.py                      # MiniLM, 32 x 128 and 32 x 256: ~35 min on this machine
    python benchmarks/speed.py --shapes 32x128 --reps 9 --json speed.json
    python benchmarks/speed.py --smoke              # tiny sizes, seconds; what CI runs
    python benchmarks/speed.py --shapes quickstart --methods floor,aflora_before,aflora_frozen,peft_lora --no-memory
    python benchmarks/speed.py --model smollm2 --shapes 8x128 --methods floor,aflora_before,aflora_frozen,peft_lora
    python benchmarks/speed.py --model smollm2 --shapes 8x128 --base-dtype bf16 --methods aflora_before,peft_lora
    python benchmarks/speed.py --model smollm2 --shapes 8x128 --precision bf16 --methods aflora_before,aflora_fused

Every method is timed alternately in one process and its step peak measured in a fresh one; what a step is, how
the rounds and the memory probe work and what each option changes: benchmarks/RESULTS.md, "How speed.py measures".
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common

OURS = {"aflora_before": ("aflora", 4), "aflora_fused": ("aflora", 4), "aflora_frozen": ("aflora", 4)}
OURS |= {"lora": ("lora", 8), "elora": ("elora", 1024)}
LLAMA_LINEARS = r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
MODELS = {"minilm": common.MINILM, "smollm2": common.SMOLLM2}  # a classifier with a trained head; a causal LM
MODEL = "minilm"  # `--model`
PEFT = {"minilm": (common.BERT_LINEARS, 8, "SEQ_CLS"), "smollm2": (LLAMA_LINEARS, 4, "CAUSAL_LM")}  # targets, r, task
# how the base is stored and which autocast the steps run under (`--base-dtype`, `--precision`)
SETTINGS: dict[str, str] = {"base_dtype": "fp32", "precision": "fp32"}
METHODS = {  # each method's label in the tables
    "floor": "floor (frozen base, grad to input)",
    "aflora_before": "AFLoRA r=4, PMs trainable",
    "aflora_fused": "AFLoRA r=4, PMs trainable, fused node forced (before the half-precision fix)",
    "aflora_frozen": "AFLoRA r=4, all PMs frozen",
    "lora": "our LoRA r=8",
    "elora": "our ELoRA r=1024",
    "peft_lora": "PEFT LoRA r=8",
    "peft_vera": "PEFT VeRA r=1024",
}
DEFAULT_METHODS = [m for m in METHODS if m != "aflora_fused"]  # the old numerics only when asked for
# the ratios a run records (`A_over_B`): paired step times (median over rounds of A's time / B's in a round) ...
PAIRED = [("aflora_before", "peft_lora"), ("aflora_frozen", "peft_lora"), ("aflora_before", "aflora_fused")]
PAIRED += [("aflora_frozen", "floor"), ("peft_vera", "aflora_before"), ("peft_vera", "aflora_frozen")]
PAIRED += [("elora", "aflora_before")]
# ... and the targets they are held against: (label, ratio, bound, at most the bound?)
TARGETS = [
    ("AFLoRA (PMs trainable) step <= 1.0 x PEFT LoRA", "aflora_before_over_peft_lora", 1.0, True),
    ("AFLoRA (PMs frozen) step <= 1.0 x PEFT LoRA", "aflora_frozen_over_peft_lora", 1.0, True),
    ("AFLoRA (PMs frozen) step <= 1.05 x floor", "aflora_frozen_over_floor", 1.05, True),
    ("PEFT VeRA / AFLoRA (PMs trainable) >= 1.8", "peft_vera_over_aflora_before", 1.8, False),
    ("PEFT VeRA / AFLoRA (PMs frozen) >= 1.8", "peft_vera_over_aflora_frozen", 1.8, False),
    ("freezer update <= 2 % of an AFLoRA step", "freezer_share_of_step", 0.02, True),
    ("AFLoRA (PMs trainable) peak memory <= PEFT LoRA", "aflora_before_memory_over_peft_lora", 1.0, True),
    ("AFLoRA (PMs frozen) peak memory <= PEFT LoRA", "aflora_frozen_memory_over_peft_lora", 1.0, True),
]


def configure(model: str, base_dtype: str, precision: str) -> None:
    """Set the model and settings every function here reads (`--model`, `--base-dtype`, `--precision`)."""
    global MODEL
    MODEL = model
    SETTINGS.update(base_dtype=base_dtype, precision=precision)


def method_label(name: str) -> str:
    """A method's name in the tables; PEFT LoRA's rank is the model's."""
    return f"PEFT LoRA r={PEFT[MODEL][1]}" if name == "peft_lora" else METHODS[name]


@dataclass
class Variant:
    """One method on its own copy of the base model, with a `step()` that trains on the batch once."""

    name: str
    step: Callable[[dict[str, Any]], None]
    trainable: int = 0
    adapter_bytes: int = 0
    optimizer: Any = None
    freezer_times: list[float] = field(default_factory=list)


def _bytes(tensors: Iterable[Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def build_variant(name: str, base: Any) -> Variant:
    """`name` (one of METHODS) on a deep copy of `base`; its `step(batch)` trains on one batch."""
    import torch

    from aflora_cli.engine.config import AdapterConfig
    from aflora_cli.engine.freezing import Freezer
    from aflora_cli.engine.inject import adaptive_matrices, inject_adapters, unfreeze_head

    model = copy.deepcopy(base)
    model.train()
    if name == "floor":  # the frozen base, its gradient flowing only to the input embeddings
        model.requires_grad_(False)
        embeddings = model.get_input_embeddings()

        def floor_step(batch: dict[str, Any]) -> None:
            inputs = {k: v for k, v in batch.items() if k != "input_ids"}
            embedded = embeddings(batch["input_ids"]).detach().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=SETTINGS["precision"] != "fp32"):
                loss = model(inputs_embeds=embedded, **inputs).loss
            loss.backward()

        return Variant(name, floor_step)

    if name.startswith("peft_"):
        from peft import LoraConfig, TaskType, VeraConfig, get_peft_model

        targets, rank, task = PEFT[MODEL]
        task_type = TaskType[task]
        if name == "peft_lora":
            config: Any = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, task_type=task_type)
        else:
            config = VeraConfig(r=1024, target_modules=targets, task_type=task_type)
        model = get_peft_model(model, config)
        model.train()
        head = [n for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
        freezer = Freezer({}, total_steps=1, t_i=0, t_f=0)
    else:
        method, rank = OURS[name]
        targets = inject_adapters(model, AdapterConfig(method=method, rank=rank))
        if name == "aflora_fused":  # the code before the fix: the fused node also under half autocast
            for target in targets:
                model.get_submodule(target.name).fusable = lambda x: True
        head = unfreeze_head(model) if MODEL == "minilm" else []
        matrices = adaptive_matrices(model, targets)
        if name == "aflora_frozen":  # run the schedule to its end: every adaptive PM frozen, as after T - t_f
            freezer = Freezer(matrices, total_steps=1, t_i=0, t_f=0)
            freezer.apply_schedule(1)
        else:  # never reaches t_i: scores update every step, nothing freezes
            freezer = Freezer(matrices, total_steps=10**9, t_i=10**9, t_f=0)
    options = {"precision": SETTINGS["precision"], "max_grad_norm": 1.0}  # TrainingConfig's default
    training = common.training_step(model, head, freezer, 4e-3, **options)
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n not in head)
    adapter_bytes = _bytes([*model.parameters(), *model.buffers()]) - _bytes([*base.parameters(), *base.buffers()])

    steps_taken = itertools.count()

    def trainer_step(batch: dict[str, Any]) -> None:
        training.optimizer_step(training.forward_backward([batch]), next(steps_taken))

    variant = Variant(name, trainer_step, trainable, adapter_bytes, training.optimizer)
    for attr in ("update_scores", "apply_schedule"):  # time the freezer's share of each step
        original = getattr(freezer, attr)

        def timed(step: int, _original: Callable[[int], Any] = original) -> Any:
            start = time.perf_counter()
            out = _original(step)
            variant.freezer_times.append(time.perf_counter() - start)
            return out

        setattr(freezer, attr, timed)
    return variant


def load_base(num_labels: int = 2) -> Any:
    """The model's base; `--base-dtype bf16` stores a causal LM's weights in bf16 as `model.dtype` does."""
    from aflora_cli.engine import base_model
    from aflora_cli.tasks.classification import load_classifier

    if MODEL == "smollm2":
        return common.load_causal_lm("smollm2", SETTINGS["base_dtype"])
    model_dir, _ = base_model.locate_model(common.MINILM)
    tokenizer = base_model.load_tokenizer(model_dir)
    return load_classifier(model_dir, num_labels, "classification", None, tokenizer.pad_token_id)


def quickstart_batches() -> list[dict[str, Any]]:
    """The quickstart's first epoch of training batches, as `aflora train` draws and collates them."""
    import yaml

    from aflora_cli.adapted.building import load_base as locate_base
    from aflora_cli.adapted.building import task_for
    from aflora_cli.recipe import parse_recipe
    from aflora_cli.training.trainer import epoch_batches

    raw = yaml.safe_load(common.QUICKSTART.read_text())
    recipe = parse_recipe({**raw, "output_dir": tempfile.gettempdir()}, "quickstart")
    found = locate_base(recipe)
    task = task_for(recipe, found)
    train = task.load_splits(found.tokenizer, ["train"]).train
    assert train is not None
    collate = task.collate(found.tokenizer)
    order = epoch_batches(len(train), 0, recipe.seed, 0, 1, recipe.training.batch_size)
    return [collate([train[i] for i in rows]) for rows in order]


def make_batches(shape: str, vocab: int) -> list[dict[str, Any]]:
    """The batches a shape names: `quickstart`, or one batch of random ids (`32x128`)."""
    import torch

    if shape == "quickstart":
        return quickstart_batches()
    batch_size, length = common.parse_batch(shape)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (batch_size, length), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if MODEL == "smollm2":  # a causal LM learns the next token of the same ids
        return [batch | {"labels": ids.clone()}]
    ids[:, 0] = 101  # [CLS]
    labels = torch.randint(0, 2, (batch_size,), generator=generator)
    return [batch | {"token_type_ids": torch.zeros_like(ids), "labels": labels}]


def time_methods(base: Any, shape: str, methods: list[str], reps: int, warmup: int) -> dict[str, Any]:
    """Median step time per method, timed alternately in rotating order after `warmup` steps each; round
    `rep` trains every method on the shape's batch number `rep` (cycling)."""
    batches = make_batches(shape, base.config.vocab_size)
    variants = [build_variant(name, base) for name in methods]
    for variant in variants:
        for _ in range(warmup):
            variant.step(batches[0])
        variant.freezer_times.clear()
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for rep in range(reps):
        shift = rep % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            start = time.perf_counter()
            variant.step(batches[rep % len(batches)])
            times[variant.name].append(time.perf_counter() - start)
    out = {}
    for variant in variants:
        series, freezer = sorted(times[variant.name]), variant.freezer_times
        per_step = [a + b for a, b in zip(freezer[::2], freezer[1::2])]  # update_scores + apply_schedule
        out[variant.name] = {
            "median_s": statistics.median(series),
            "min_s": series[0],
            "max_s": series[-1],
            "times_s": times[variant.name],
            "freezer_median_s": statistics.median(per_step) if per_step else None,
            "trainable": variant.trainable,
            "adapter_bytes": variant.adapter_bytes,
        }
    return out


def memory_probe(
    method: str, shape: str, model: str, base_dtype: str, precision: str, steps: int = 2, warmup: int = 2
) -> dict[str, Any]:
    """Peak RSS growth over `steps` training steps of `method`, from a reset high-water mark (Linux), after
    `warmup` steps (so one-time allocations such as thread pools, BLAS buffers and AdamW's state are not counted
    as step memory); AdamW's state is added back from its tensors' sizes."""
    common.offline_and_quiet()
    configure(model, base_dtype, precision)
    base = load_base()
    batches = make_batches(shape, base.config.vocab_size)
    variant = build_variant(method, base)
    del base
    for number in range(warmup + steps):
        if number == warmup:
            resident = common.Resident()
        variant.step(batches[number % len(batches)])
    states = variant.optimizer.state.values() if variant.optimizer else []  # AdamW's
    adapter = variant.adapter_bytes + _bytes(t for state in states for t in state.values() if hasattr(t, "numel"))
    return {"method": method, "step_bytes": resident.peak(), "adapter_bytes": adapter}


def measure_memory(methods: list[str], shape: str, in_process: bool) -> dict[str, Any]:
    """Each method's `memory_probe` in a fresh process (in this one for `--smoke`: then the numbers are not
    comparable across methods)."""
    settings = {"shape": shape, "model": MODEL, **SETTINGS}
    if in_process:
        return {method: memory_probe(method, steps=1, warmup=0, **settings) for method in methods}
    env = {**common.OFFLINE, **common.MALLOC_ENV}
    failed = {"step_bytes": None, "adapter_bytes": None}
    return {
        m: common.in_fresh_process("speed", "memory_probe", env, method=m, **settings) or {"method": m, **failed}
        for m in methods
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def paired_ratio(timing: dict[str, Any], a: str, b: str) -> float | None:
    """Median over rounds of (time of `a`) / (time of `b`) in the same round."""
    if a not in timing or b not in timing:
        return None
    return statistics.median(x / y for x, y in zip(timing[a]["times_s"], timing[b]["times_s"]))


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def report(shape: str, timing: dict[str, Any], memory: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A markdown table and the target ratios for one shape."""
    if shape == "quickstart":
        title = "the quickstart's training batches (32 rows each, padded to the longest, max length 64)"
    else:
        title = "batch {} x {} tokens".format(*common.parse_batch(shape))
    lines = [
        f"### {title}",
        "",
        "| method | trainable (no head) | median step (s) | min / max (s) | x PEFT LoRA (paired) | x floor (paired) "
        "| step peak (MiB) | adapter + AdamW (MiB) | total (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    totals: dict[str, float | None] = {}
    for name, t in timing.items():
        step_b, adapter_b = (memory.get(name, {}).get(key) for key in ("step_bytes", "adapter_bytes"))
        totals[name] = step_b + adapter_b if step_b is not None and adapter_b is not None else None
        paired = [_fmt(paired_ratio(timing, name, other), ".3f") for other in ("peft_lora", "floor")]
        mib = [_fmt(None if b is None else b / common.MIB, ".0f") for b in (step_b, adapter_b, totals[name])]
        times = [f"{t['median_s']:.3f}", f"{t['min_s']:.3f} / {t['max_s']:.3f}"]
        lines.append(common.row(method_label(name), f"{t['trainable']:,}", *times, *paired, *mib))
    before = timing.get("aflora_before", {}).get("median_s")
    freezer = timing.get("aflora_before", {}).get("freezer_median_s")
    ratios = {f"{a}_over_{b}": paired_ratio(timing, a, b) for a, b in PAIRED}
    ratios["freezer_share_of_step"] = _ratio(freezer, before)
    for name in ("aflora_before", "aflora_frozen"):
        ratios[f"{name}_memory_over_peft_lora"] = _ratio(totals.get(name), totals.get("peft_lora"))
    lines += ["", "| target | measured | met |", "|---|---:|:---:|"]
    for label, key, bound, at_most in TARGETS:
        value = ratios[key]
        met = "n/a" if value is None else ("yes" if (value <= bound if at_most else value >= bound) else "NO")
        shown = _fmt(value * 100, ".2f") + " %" if "2 %" in label and value is not None else _fmt(value, ".3f")
        lines.append(f"| {label} | {shown} | {met} |")
    if ratios["aflora_before_over_aflora_fused"] is not None:
        cost = ratios["aflora_before_over_aflora_fused"]
        lines.append(f"\nthe half-precision fix (separate low-rank path) costs x{cost:.3f} of the fused step")
    if freezer is not None:
        lines.append(f"\nfreezer update (score EMAs + schedule) median: {freezer * 1e3:.2f} ms per step")
    return "\n".join(lines), ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 2 rounds, in-process memory: seconds")
    parser.add_argument("--shapes", default="32x128,32x256", help="BxL pairs or `quickstart`, comma separated")
    parser.add_argument("--reps", type=int, default=15, help="timed rounds (one step per method each)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    parser.add_argument("--json", type=Path, default=None, help="also write all measurements here")
    parser.add_argument("--model", choices=tuple(MODELS), default="minilm", help="the base model measured")
    parser.add_argument("--base-dtype", choices=("fp32", "bf16"), default="fp32", help="causal LM base storage")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="autocast of the steps")
    args = parser.parse_args(argv)
    if args.base_dtype != "fp32" and args.model == "minilm":
        parser.error("--base-dtype: only for --model smollm2 (MiniLM's classifier head stays fp32)")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    shapes = [shape.strip().lower() for shape in args.shapes.split(",") if shape.strip()]
    for shape in set(shapes) - {"quickstart"}:
        common.parse_batch(shape)  # raises on a malformed shape
    if "quickstart" in shapes and args.model != "minilm":
        parser.error("--shapes quickstart: the quickstart's batches are MiniLM's; use --model minilm")
    reps, warmup = args.reps, args.warmup
    if args.smoke:
        shapes, reps, warmup = ["2x16"], 2, 1
    configure(args.model, args.base_dtype, args.precision)
    common.offline_and_quiet()
    import torch

    info = common.machine()
    print(
        f"# speed: {MODELS[MODEL]}, {info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads, "
        f"torch {info['torch']}"
    )
    torch.manual_seed(0)
    base = load_base()
    results: dict[str, Any] = {"machine": info, "settings": dict(SETTINGS), "reps": reps, "warmup": warmup}
    results["shapes"] = {}
    for shape in shapes:
        started = time.perf_counter()
        timing = time_methods(base, shape, methods, reps, warmup)
        memory = {} if args.no_memory else measure_memory(methods, shape, in_process=args.smoke)
        table, ratios = report(shape, timing, memory)
        print(table)
        print(f"({time.perf_counter() - started:.0f} s)\n", flush=True)
        results["shapes"][shape] = {"timing": timing, "memory": memory, "ratios": ratios}
    if args.json:
        common.write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
