"""The adapter keeps its precision over a half-precision base: stored in bf16/fp16, or fp32 under autocast.

Set-up of the defect this guards against: a LLaMA down_proj (512 → 64), r = 4, Λb = 1e-3 (early training,
when Λb has just left zero), inputs aligned with A's first row. Forming W0 + ΔW in half precision rounded
away most of ΔW (0.25 of the adapter's effect survived in bf16 with 256 rows). The adapter's effect on the
output, and the gradients of A, B, Λd and Λb, must match Eq. 1 computed by hand in fp32 within the
output's rounding, in every dtype users run, for few rows (the thin shape) and many (the merged shape).
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, nullcontext

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aflora_cli.engine.layer import AdapterLinear

MODES = {  # name: (dtype the base is stored in, autocast dtype or None)
    "bf16 stored": (torch.bfloat16, None),
    "fp16 stored": (torch.float16, None),
    "bf16 autocast": (torch.float32, torch.bfloat16),
    "fp16 autocast": (torch.float32, torch.float16),
}
ROWS = {"thin": 4, "merged": 256}


@pytest.fixture(scope="module")
def down_proj() -> torch.nn.Linear:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=512,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    return LlamaForCausalLM(config).model.layers[0].mlp.down_proj


def _adapter(base: torch.nn.Linear, dtype: torch.dtype) -> AdapterLinear:
    torch.manual_seed(1)
    layer = AdapterLinear(copy.deepcopy(base).to(dtype), 4)
    with torch.no_grad():
        layer.lambda_b.fill_(1e-3)
    return layer


def _inputs(layer: AdapterLinear, rows: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    return layer.lora_A.detach()[0].repeat(rows, 1) * 3 + 0.01 * torch.randn(rows, 512, generator=generator)


def _context(autocast: torch.dtype | None) -> AbstractContextManager[object]:
    return torch.autocast("cpu", dtype=autocast) if autocast is not None else nullcontext()


def _ratio(found: torch.Tensor, expected: torch.Tensor) -> float:
    """How much of `expected` `found` holds: its projection on `expected`, as a fraction."""
    return float((found * expected).sum() / (expected * expected).sum())


def _eq1_by_hand(layer: AdapterLinear, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eq. 1's low-rank term and its gradients under loss = Σ out·G, all in fp32 with plain autograd."""
    params = {
        name: p.detach().clone().requires_grad_(True) for name, p in layer.named_parameters() if "base" not in name
    }
    a, b, d, lb = params["lora_A"], params["lora_B"], params["lambda_d"], params["lambda_b"]
    delta = lb * ((d * (x @ a.t())) @ b.t())
    (delta * _grad_weights(delta.shape)).sum().backward()
    return {"effect": delta.detach(), **{name: p.grad for name, p in params.items()}}  # type: ignore[dict-item]


def _grad_weights(shape: torch.Size) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("rows", ROWS.values(), ids=ROWS.keys())
@pytest.mark.parametrize("mode", MODES)
def test_the_adapter_effect_and_its_gradients_survive_half_precision(
    down_proj: torch.nn.Linear, mode: str, rows: int
) -> None:
    stored, autocast = MODES[mode]
    layer = _adapter(down_proj, stored)
    assert all(p.dtype == torch.float32 for name, p in layer.named_parameters() if "base" not in name)
    x = _inputs(layer, rows)
    expected = _eq1_by_hand(layer, x)
    x_in = x.to(stored)
    with _context(autocast):
        out = layer(x_in)
        with torch.no_grad():
            base_out = layer.base(x_in)
    effect = out.float() - base_out.float()
    assert 0.85 < _ratio(effect, expected["effect"]) < 1.15
    (out.float() * _grad_weights(out.shape)).sum().backward()
    for name in ("lora_A", "lora_B", "lambda_d", "lambda_b"):
        grad = getattr(layer, name).grad
        assert grad is not None and grad.dtype == torch.float32
        assert 0.85 < _ratio(grad, expected[name]) < 1.15, name
        assert float((grad - expected[name]).norm() / expected[name].norm()) < 0.15, name


@pytest.mark.parametrize("rows", ROWS.values(), ids=ROWS.keys())
def test_fp32_keeps_the_fused_node_and_equals_eq1(down_proj: torch.nn.Linear, rows: int) -> None:
    layer = _adapter(down_proj, torch.float32)
    x = _inputs(layer, rows)
    assert layer.fusable(x)
    expected = _eq1_by_hand(layer, x)
    out = layer(x)
    with torch.no_grad():
        effect = out - layer.base(x)
    assert torch.allclose(effect, expected["effect"], rtol=1e-3, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer.fusable(x)


def test_merging_a_half_precision_base_rounds_once(down_proj: torch.nn.Linear) -> None:
    """W0 + ΔW is summed in fp32 and rounded once to bf16, so the merged weight is the nearest bf16 value."""
    layer = _adapter(down_proj, torch.bfloat16)
    with torch.no_grad():
        layer.lambda_b.fill_(0.05)
        expected = (layer.base.weight.float() + layer.delta_weight()).to(torch.bfloat16)
    layer.merge()
    assert torch.equal(layer.base.weight, expected)
