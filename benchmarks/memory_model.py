"""What the weights of a training run take, by arithmetic: the frozen base in each storage, the adapters, their
gradients and AdamW's state (activations are measured by `memory.py`, not modelled here yet).

    python benchmarks/memory_model.py                      # LLaMA-7B with the authors' GSM8K adapter settings
    python benchmarks/memory_model.py --model smollm2      # SmolLM2-135M with the paper's r = 4

Bytes per base parameter: fp32 4, bf16/fp16 2; bitsandbytes 8-bit 1 (+ one fp32 scale per output row); NF4
0.5 (+ per block of 64 one absmax: fp32 4 bytes, or with double quantization 1 byte plus one fp32 per 256
blocks). Only the linear layers inside the blocks are quantized; embeddings, norms and the output layer stay
in `model.dtype`. Adapters (A, B, Λd, Λb) are fp32; each trainable one adds its gradient (4 bytes) and
AdamW's two moments (8 bytes).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

GB = 1e9


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
    "smollm2": Llama(576, 1536, 30, 9, 3, 49152, tied=True),
}
# (rank, targets with A/B trainable at the start, targets with A/B frozen) per setting
SETTINGS = {
    "llama-7b": (32, ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], []),  # authors' GSM8K scripts
    "smollm2": (4, ["gate_proj", "up_proj", "down_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"]),  # the paper
}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


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


def adapter_bytes(model: Llama, rank: int, trainable: list[str], frozen: list[str]) -> dict[str, float]:
    """Adapter weights (fp32) and, for what trains at the start, gradients and AdamW state."""
    weights = train = 0
    for name, (i, o) in model.linears().items():
        if name not in trainable and name not in frozen:
            continue
        projections, vectors = rank * (i + o), rank + o
        weights += model.layers * (projections + vectors)
        train += model.layers * (vectors + (projections if name in trainable else 0))
    return {"weights": 4 * weights, "gradients": 4 * train, "adamw": 8 * train, "trainable": train}


def table(name: str) -> str:
    model = MODELS[name]
    rank, trainable, frozen = SETTINGS[name]
    adapters = adapter_bytes(model, rank, trainable, frozen)
    adapter_total = adapters["weights"] + adapters["gradients"] + adapters["adamw"]
    rows = [
        ("fp32", base_bytes(model, "fp32")),
        ("bf16", base_bytes(model, "bf16")),
        ("8-bit (+ bf16 embeddings)", base_bytes(model, "bf16", 8)),
        ("NF4, double quant (+ bf16 embeddings)", base_bytes(model, "bf16", 4)),
    ]
    lines = [
        f"{name}: {model.block_linear_params() + model.other_params():,} base parameters; adapters r = {rank}, "
        f"{adapters['trainable']:,} trainable at the start: {adapter_total / GB:.2f} GB with gradients and AdamW",
        "",
        "| base stored as | base weights (GB) | + adapters, gradients, AdamW (GB) |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {value / GB:.2f} | {(value + adapter_total) / GB:.2f} |" for label, value in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="llama-7b")
    print(table(parser.parse_args(argv).model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
