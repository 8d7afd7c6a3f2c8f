"""benchmarks/memory_model.py's bytes of the base against transformers' own `get_memory_footprint()` of a tiny
LLaMA loaded here in each storage (the same arithmetic then gives the README's LLaMA-7B table)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from text_runs import model_dir
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from memory_model import Llama, base_bytes

pytest.importorskip("bitsandbytes")


def _tiny() -> tuple[Path, Llama]:
    folder = model_dir("llama-64")
    c = AutoConfig.from_pretrained(folder)
    sizes = Llama(
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.vocab_size,
        c.tie_word_embeddings,
    )
    return folder, sizes


@pytest.mark.parametrize(
    ("dtype", "bits", "quantization"),
    [
        ("fp32", None, None),
        ("bf16", None, None),
        ("bf16", 8, BitsAndBytesConfig(load_in_8bit=True)),
        ("bf16", 4, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True)),
    ],
    ids=["fp32", "bf16", "int8", "nf4"],
)
def test_base_bytes_match_the_loaded_models_footprint(dtype: str, bits: int | None, quantization: object) -> None:
    folder, sizes = _tiny()
    kwargs: dict[str, object] = {"dtype": {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]}
    if quantization is not None:
        kwargs |= {"quantization_config": quantization, "device_map": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    assert sizes.block_linear_params() + sizes.other_params() == sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters()
    )
    # 8-bit: the footprint leaves out bitsandbytes' per-row fp32 scales (2 % of this tiny model, 0.07 % of 7B)
    assert base_bytes(sizes, dtype, bits) == pytest.approx(model.get_memory_footprint(), rel=0.025)
