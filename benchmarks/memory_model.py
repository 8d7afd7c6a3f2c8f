"""What a training run takes, by arithmetic: the frozen base in each storage, the adapters, their gradients and
AdamW's state, and the activations kept for the backward pass, with and without gradient checkpointing.

    python benchmarks/memory_model.py                      # LLaMA-7B, the authors' GSM8K settings, batch 1 x 256
    python benchmarks/memory_model.py --model smollm2 --batch 4x128
    python benchmarks/memory_model.py --sharded                 # LLaMA-7B/13B/70B per GPU under training.fsdp
    python benchmarks/memory_model.py --measured benchmarks/results/memory.json \
        --fsdp benchmarks/results/fsdp_memory_llama300m_fp32.json   # the sharded model against fsdp_memory.py

Its bytes per base parameter, per adapter and per token of activations, in words: benchmarks/RESULTS.md,
"How memory_model.py counts".
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

from common import MIB, parse_batch, row

GB = 1e9
CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
CONFIG_KEYS += ("num_key_value_heads", "vocab_size", "tie_word_embeddings")  # in the order of Llama's fields


@dataclass(frozen=True)
class Llama:
    """The sizes of a LLaMA-architecture model that decide its parameter count."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    def config(self) -> dict[str, Any]:
        """These sizes as `transformers.LlamaConfig` keyword arguments (common.llama_dir builds models so)."""
        return dict(zip(CONFIG_KEYS, astuple(self)))

    @property
    def kv(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear type in one block."""
        h, f, kv = self.hidden, self.intermediate, self.kv
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, f),
            "up_proj": (h, f),
            "down_proj": (f, h),
        }

    def block_linear_params(self) -> int:
        return self.layers * sum(i * o for i, o in self.linears().values())

    def other_params(self) -> int:
        """Embeddings, the output layer (unless tied) and the norms."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden


MODELS = {
    "llama-7b": Llama(4096, 11008, 32, 32, 32, 32000, tied=False),
    "llama-13b": Llama(5120, 13824, 40, 40, 40, 32000, tied=False),
    "llama-70b": Llama(8192, 28672, 80, 64, 8, 32000, tied=False),  # LLaMA-2-70B: grouped-query attention
    "smollm2": Llama(576, 1536, 30, 9, 3, 49152, tied=True),
    "llama-300m": Llama(1024, 2816, 24, 16, 16, 32000, tied=False),  # common.llama_dir builds these two
    "llama-small": Llama(512, 1376, 4, 8, 8, 32000, tied=False),
}
# (rank, targets with A/B trainable at the start, targets with A/B frozen) per setting
AUTHORS_GSM8K = (32, ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], [])  # the authors' GSM8K scripts
SETTINGS = {name: AUTHORS_GSM8K for name in ("llama-7b", "llama-13b", "llama-70b")}
SETTINGS["smollm2"] = (4, ["gate_proj", "up_proj", "down_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"])  # paper
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# which linear types read the same input tensor (an input kept once when several adapters need it in fp32)
INPUT_GROUPS = dict.fromkeys(("q_proj", "k_proj", "v_proj"), "attn_in") | dict.fromkeys(
    ("gate_proj", "up_proj"), "mlp_in"
)


def base_bytes(model: Llama, dtype: str, bits: int | None = None, double_quant: bool = True) -> float:
    """The frozen base's weights in bytes."""
    linear = model.block_linear_params()
    other = model.other_params() * DTYPE_BYTES[dtype]
    if bits is None:
        return linear * DTYPE_BYTES[dtype] + other
    if bits == 8:
        rows = model.layers * sum(o for _, o in model.linears().values())
        return linear + 4 * rows + other
    absmax = (1 + 4 / 256) / 64 if double_quant else 4 / 64
    return linear * (0.5 + absmax) + other


def adapter_bytes(
    model: Llama, rank: int, trainable: list[str], frozen: list[str], vectors: bool = True
) -> dict[str, float]:
    """Adapter weights (fp32) and, for what trains at the start, gradients and AdamW state (`vectors`: AFLoRA's
    Λd and Λb; plain LoRA has none)."""
    weights = train = 0
    for name, (i, o) in model.linears().items():
        if name not in trainable and name not in frozen:
            continue
        projections = rank * (i + o)
        vector_count = rank + o if vectors else 0
        weights += model.layers * (projections + vector_count)
        train += model.layers * (vector_count + (projections if name in trainable else 0))
    return {"weights": 4 * weights, "gradients": 4 * train, "adamw": 8 * train, "trainable": train}


@dataclass(frozen=True)
class Run:
    """What decides a run's activations besides the model: the compute dtype of the blocks, the adapters and the
    batch."""

    dtype: str
    rank: int
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    rows: int
    length: int
    checkpointing: bool = False


def block_activation_bytes(model: Llama, run: Run) -> float:
    """Bytes one block keeps per token for the backward pass (its input needing a gradient)."""
    h, f, d = model.hidden, model.intermediate, DTYPE_BYTES[run.dtype]
    norms = 2 * (4 * h + 4)
    attention = d * (2 * h + 2 * model.kv) + 4 * model.heads
    mlp = 3 * d * f
    half = run.dtype != "fp32"
    adapted = [*run.trainable, *run.frozen]
    adapters = sum(4 * run.rank * (1 if half else 3) for _ in adapted)
    sizes = model.linears()
    if half:  # each adapter whose A trains casts its own fp32 copy of its input
        inputs = sum(4 * sizes[name][0] for name in run.trainable)
    else:  # the fused node keeps the input tensor itself, shared by the layers that read it
        groups = {INPUT_GROUPS.get(name, name): sizes[name][0] for name in run.trainable}
        inputs = sum(4 * size for size in groups.values())
    return norms + attention + mlp + adapters + inputs


def activation_bytes(model: Llama, run: Run) -> dict[str, float]:
    """`saved`: what autograd keeps at the end of the forward pass; `peak`: with what lives beside it at the start
    of the backward pass (the logits and two vocabulary-sized gradients; with checkpointing, one rebuilt block)."""
    tokens = run.rows * run.length
    h, d, vocab = model.hidden, DTYPE_BYTES[run.dtype], model.vocab
    block = block_activation_bytes(model, run)
    head = (4 * h + 4) + 4 * vocab + 8  # final norm, log-softmax, labels
    if run.checkpointing:
        saved = tokens * (model.layers * d * h + head)
        rebuilt = tokens * block
    else:
        saved = tokens * (model.layers * block - (4 * h + 4) + head)
        rebuilt = 0.0
    beside = tokens * (d * vocab + 2 * 4 * vocab)
    return {"saved": saved, "peak": saved + max(beside, rebuilt)}


def training_bytes(model: Llama, storage: str, run: Run, vectors: bool = True) -> dict[str, float]:
    """A run's bytes by part: `storage` is fp32, bf16, int8 or nf4 (quantized bases keep the rest in
    `run.dtype`, which is also the blocks' compute dtype)."""
    bits = {"int8": 8, "nf4": 4}.get(storage)
    adapters = adapter_bytes(model, run.rank, list(run.trainable), list(run.frozen), vectors)
    activations = activation_bytes(model, run)
    parts = {
        "base": base_bytes(model, run.dtype, bits),
        "adapters": adapters["weights"] + adapters["gradients"] + adapters["adamw"],
        "activations": activations["peak"],
    }
    return parts | {"total": sum(parts.values())}


def sharded_bytes(model: Llama, storage: str, run: Run, processes: int, vectors: bool = True) -> dict[str, float]:
    """One process's bytes under `training.fsdp` on `processes` processes: its shard of the base, plus the rest of
    what FSDP gathers whole while it computes — the root unit (embeddings, output layer, final norm: gathered at
    the first forward and kept for the backward) and two decoder blocks (the one computing and the next,
    prefetched); the adapters with their gradients and AdamW state whole on every process (training/sharding.py);
    the activations of the process's own rows. One process is `training_bytes` (nothing is sharded)."""
    parts = training_bytes(model, storage, run, vectors)
    if processes == 1:
        return parts
    width = DTYPE_BYTES[run.dtype]
    block = (model.block_linear_params() // model.layers + 2 * model.hidden) * width
    root = (model.other_params() - 2 * model.layers * model.hidden) * width  # less the blocks' own norms
    parts = parts | {"base": parts["base"] / processes, "gathered": (root + 2 * block) * (1 - 1 / processes)}
    return parts | {"total": parts["base"] + parts["gathered"] + parts["adapters"] + parts["activations"]}


def sharded_table(rows: int = 1, length: int = 256, gpus: tuple[int, ...] = (1, 2, 4, 8)) -> str:
    """GB per GPU for LLaMA-7B, 13B and 70B on a bf16 base with the authors' GSM8K settings and gradient
    checkpointing, by the number of GPUs `training.fsdp` shards over (one: no sharding)."""
    heads = [f"{n} GPU" + ("s" if n > 1 else "") for n in gpus]
    lines = [row("model", "base parameters", *heads), "|---|---:|" + "---:|" * len(gpus)]
    for name in ("llama-7b", "llama-13b", "llama-70b"):
        model, (rank, trainable, frozen) = MODELS[name], SETTINGS[name]
        run = Run("bf16", rank, tuple(trainable), tuple(frozen), rows, length, checkpointing=True)
        cells = [f"{sharded_bytes(model, 'bf16', run, n)['total'] / GB:.1f}" for n in gpus]
        lines.append(row(name, f"{(model.block_linear_params() + model.other_params()) / 1e9:.1f} B", *cells))
    return "\n".join(lines)


def table(name: str, rows: int, length: int) -> str:
    """What the model needs in each storage, with the activations of a `rows` x `length` batch."""
    model, (rank, trainable, frozen) = MODELS[name], SETTINGS[name]
    adapters = adapter_bytes(model, rank, trainable, frozen)
    adapter_total = adapters["weights"] + adapters["gradients"] + adapters["adamw"]
    lines = [
        f"{name}: {model.block_linear_params() + model.other_params():,} base parameters; adapters r = {rank}, "
        f"{adapters['trainable']:,} trainable at the start: {adapter_total / GB:.2f} GB with gradients and AdamW; "
        f"activations of a {rows} x {length}-token batch",
        "",
        "| base stored as | base weights (GB) | + adapters, gradients, AdamW (GB) | + activations (GB) "
        "| + activations, gradient checkpointing (GB) |",
        "|---|---|---|---|---|",
    ]
    for label, storage, dtype in [
        ("fp32", "fp32", "fp32"),
        ("bf16", "bf16", "bf16"),
        ("8-bit (+ bf16 embeddings)", "int8", "bf16"),
        ("NF4, double quant (+ bf16 embeddings)", "nf4", "bf16"),
    ]:
        runs = [Run(dtype, rank, tuple(trainable), tuple(frozen), rows, length, c) for c in (False, True)]
        plain, ckpt = (training_bytes(model, storage, run) for run in runs)
        gb = (plain["base"], plain["base"] + adapter_total, plain["total"], ckpt["total"])
        lines.append(row(label, *(f"{value / GB:.2f}" for value in gb)))
    return "\n".join(lines)


# how memory.py adapts its models: AFLoRA r=4 with the paper's policy, PEFT LoRA r=8 on all seven types
PROBED = {
    "aflora": (4, ("gate_proj", "up_proj", "down_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"), True),
    "peft_lora": (8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), (), False),
}


def predicted_peak(record: dict[str, Any], processes: int = 1) -> float:
    """The model's bytes for one `memory.py` or `fsdp_memory.py` record (base or its shard, adapters with AdamW,
    activations at the step's peak) on one process of `processes` sharding the base."""
    model = MODELS[record.get("model", "smollm2")]
    rank, trainable, frozen, vectors = PROBED[record["method"]]
    rows, length = parse_batch(record["batch"])
    dtype = "fp32" if record["storage"] == "fp32" else "bf16"  # the quantized probes compute in bf16
    run = Run(dtype, rank, trainable, frozen, rows, length, record.get("checkpointing", False))
    return sharded_bytes(model, record["storage"], run, processes, vectors)["total"]


def process_overhead(records: list[dict[str, Any]], model: str = "smollm2") -> dict[str, float]:
    """What the process holds beyond the modelled tensors (thread pools, allocator, matmul buffers): the mean of
    measured minus modelled peaks over one model's fp32 and bf16 records, per storage — fitted on `model` so
    that it can be checked on another."""
    fitted = {}
    for storage in ("fp32", "bf16"):
        mine = [r for r in records if r.get("model", "smollm2") == model and r["storage"] == storage]
        if mine:
            fitted[storage] = statistics.mean(r["steps_peak"] - predicted_peak(r) for r in mine)
    return fitted


def compare(records: list[dict[str, Any]], fsdp: list[dict[str, Any]] | None = None) -> str:
    """The model against `memory.py`'s measured step peaks, one row per record: alone, and with the process
    overhead fitted on SmolLM2's records (a check out of sample for the other model). With `fsdp`, against
    `fsdp_memory.py`'s step peaks per process instead (rank 0's: every rank holds the same; DDP as one
    unsharded process)."""
    overhead = process_overhead(records)
    if fsdp is None:
        lines = [
            ", ".join(f"process overhead fitted on smollm2, {k}: {v / MIB:.0f} MiB" for k, v in overhead.items()),
            "",
            "| model | base | method | grad ckpt | batch | measured (MiB) | model (MiB) | model / measured "
            "| + overhead / measured |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        compared = [(r, predicted_peak(r), [r["method"], "yes" if r["checkpointing"] else "no"]) for r in records]
    else:
        lines = [
            "| model | base | mode | batch | measured (MiB) | model (MiB) | model / measured | + overhead / measured |",
            "|---|---|---|---|---|---|---|---|",
        ]
        processes = {"ddp": 1, "fsdp": 2}
        compared = [
            (r, predicted_peak(r | {"method": "aflora"}, processes[r["mode"]]), [r["mode"]])
            for r in fsdp
            if r["rank"] == 0
        ]
    for record, predicted, how in compared:
        measured, extra = record["steps_peak"], overhead.get(record["storage"])
        with_overhead = "—" if extra is None else f"{(predicted + extra) / measured:.2f}"
        cells = [f"{measured / MIB:.0f}", f"{predicted / MIB:.0f}", f"{predicted / measured:.2f}", with_overhead]
        lines.append(row(record.get("model", "smollm2"), record["storage"], *how, record["batch"], *cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="llama-7b")
    parser.add_argument("--batch", default="1x256", help="ROWSxTOKENS of the activations (default: the authors')")
    parser.add_argument("--measured", type=Path, help="compare with memory.py's records (a results JSON file)")
    parser.add_argument("--fsdp", type=Path, help="with --measured: compare with fsdp_memory.py's records instead")
    parser.add_argument("--sharded", action="store_true", help="GB per GPU of 7B/13B/70B under training.fsdp")
    args = parser.parse_args(argv)
    if args.measured:
        fsdp = json.loads(args.fsdp.read_text())["records"] if args.fsdp else None
        print(compare(json.loads(args.measured.read_text())["runs"], fsdp))
    else:
        print(sharded_table() if args.sharded else table(args.model, *parse_batch(args.batch)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
