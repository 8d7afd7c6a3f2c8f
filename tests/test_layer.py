"""AdapterLinear against Eq. 1 of the paper: Y = W0·X + Λb·B·Λd·A·X (plus the base layer's bias)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from aflora_cli.engine.layer import AdapterLinear, merging_is_cheaper

IN, OUT, RANK = 24, 40, 4


def _base(seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT, bias=bias)


def _adapter(seed: int = 0, **kwargs) -> AdapterLinear:
    base = _base(seed, bias=kwargs.pop("bias", True))
    torch.manual_seed(seed + 100)
    return AdapterLinear(base, RANK, **kwargs)


def _randomise_vectors(layer: AdapterLinear, seed: int = 7) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lambda_b.copy_(torch.randn(layer.lambda_b.shape, generator=generator))
        layer.lambda_d.copy_(torch.randn(layer.lambda_d.shape, generator=generator))


def _eq1(layer: AdapterLinear, x: torch.Tensor) -> torch.Tensor:
    """Eq. 1 with explicit matrices, one column vector per row of x: W0 x + b + diag(Λb) B diag(Λd) A x."""
    w0 = layer.base.weight.detach()
    b = layer.base.bias.detach() if layer.base.bias is not None else torch.zeros(OUT)
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    Lb, Ld = torch.diag(layer.lambda_b.detach()), torch.diag(layer.lambda_d.detach())
    X = x.reshape(-1, IN).T.double()  # in × n
    Y = w0.double() @ X + b.double().unsqueeze(1) + Lb.double() @ B.double() @ Ld.double() @ A.double() @ X
    return Y.T.reshape(*x.shape[:-1], OUT)


def test_forward_matches_eq1_with_nonzero_lambda_b():
    layer = _adapter()
    _randomise_vectors(layer)
    x = torch.randn(3, 5, IN)
    y = layer(x)
    expected = _eq1(layer, x)
    assert y.shape == (3, 5, OUT)
    assert torch.allclose(y.double(), expected, atol=1e-5, rtol=1e-5)
    # and the adapter path really contributes: it differs from the base layer alone
    assert not torch.allclose(y, layer.base(x), atol=1e-3)


def test_forward_matches_eq1_without_bias():
    layer = _adapter(bias=False)
    _randomise_vectors(layer)
    x = torch.randn(6, IN)
    assert torch.allclose(layer(x).double(), _eq1(layer, x), atol=1e-5, rtol=1e-5)


def test_fresh_adapter_equals_base_exactly():
    layer = _adapter()
    x = torch.randn(4, 3, IN)
    reference = _base(0)(x)  # an independent copy of W0, b
    assert torch.equal(layer(x), reference)


def test_init_vectors_and_kaiming_bounds():
    torch.manual_seed(3)
    base = nn.Linear(64, 96)
    layer = AdapterLinear(base, 8, lambda_d_init=0.25)
    assert layer.lambda_d.shape == (8,)
    assert torch.equal(layer.lambda_d.detach(), torch.full((8,), 0.25))
    assert layer.lambda_b.shape == (96,)
    assert torch.equal(layer.lambda_b.detach(), torch.zeros(96))
    assert layer.lora_A.shape == (8, 64) and layer.lora_B.shape == (96, 8)
    bound_a, bound_b = math.sqrt(6 / 64), math.sqrt(6 / 8)  # kaiming-uniform, a = 0: sqrt(6 / fan_in)
    assert layer.lora_A.abs().max().item() <= bound_a
    assert layer.lora_B.abs().max().item() <= bound_b
    # uniform over the whole range, not some narrower init (512 / 768 draws: the max nears the bound)
    assert layer.lora_A.abs().max().item() > 0.9 * bound_a
    assert layer.lora_B.abs().max().item() > 0.9 * bound_b
    # the base weights are frozen, the four adapter tensors train
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert all(p.requires_grad for p in (layer.lora_A, layer.lora_B, layer.lambda_d, layer.lambda_b))


def test_lora_variant_zero_b_and_scaling():
    alpha = 16.0
    layer = _adapter(vectors=False, zero_b=True, scaling=alpha / RANK)
    assert layer.lambda_d is None and layer.lambda_b is None
    assert torch.equal(layer.lora_B.detach(), torch.zeros(OUT, RANK))
    assert layer.lora_A.abs().max().item() <= 1 / math.sqrt(IN)  # nn.Linear's init for A (a = sqrt(5))
    assert layer.lora_A.abs().max().item() > 0
    x = torch.randn(5, IN)
    assert torch.equal(layer(x), layer.base(x))  # B = 0: the fresh layer is the base layer
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(OUT, RANK))
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    W0, b = layer.base.weight.detach().double(), layer.base.bias.detach().double()
    expected = (W0 @ x.double().T + b.unsqueeze(1) + (alpha / RANK) * B @ A @ x.double().T).T
    assert torch.allclose(layer(x).double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(layer.delta_weight().double(), (alpha / RANK) * B @ A, atol=1e-6)


def test_delta_weight_is_the_explicit_product():
    layer = _adapter()
    _randomise_vectors(layer)
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    expected = torch.diag(layer.lambda_b.detach()) @ B @ torch.diag(layer.lambda_d.detach()) @ A
    delta = layer.delta_weight()
    assert delta.shape == (OUT, IN)
    assert torch.allclose(delta, expected, atol=1e-6)


def test_merge_then_unmerge():
    layer = _adapter()
    _randomise_vectors(layer)
    x = torch.randn(7, IN)
    w0 = layer.base.weight.detach().clone()
    unmerged = layer(x).detach()
    layer.merge()
    assert layer.merged
    assert torch.allclose(layer.base.weight, w0 + layer.delta_weight(), atol=1e-6)
    assert torch.allclose(layer(x), unmerged, atol=1e-5)
    layer.merge()  # a second merge is a no-op, not a double add
    assert torch.allclose(layer(x), unmerged, atol=1e-5)
    layer.unmerge()
    assert not layer.merged
    assert torch.allclose(layer.base.weight, w0, atol=1e-6)
    assert torch.allclose(layer(x), unmerged, atol=1e-5)


def test_dropout_only_on_adapter_input():
    layer = _adapter(dropout=0.5)
    x = torch.randn(8, IN)
    # Λb = 0: even in train mode the output is the base layer's, so dropout never touches the base path
    layer.train()
    assert torch.equal(layer(x), layer.base(x))

    _randomise_vectors(layer)
    layer.eval()
    assert torch.allclose(layer(x).double(), _eq1(layer, x), atol=1e-5, rtol=1e-5)

    layer.train()
    torch.manual_seed(11)
    y = layer(x)
    torch.manual_seed(11)
    dropped = nn.functional.dropout(x, 0.5, training=True)  # the same mask the layer drew
    assert not torch.equal(dropped, x)
    up = torch.diag(layer.lambda_b.detach()) @ layer.lora_B.detach() @ torch.diag(layer.lambda_d.detach())
    expected = layer.base(x) + dropped @ layer.lora_A.detach().T @ up.T
    assert torch.allclose(y, expected, atol=1e-5)
    assert not torch.allclose(y, layer.eval()(x), atol=1e-3)  # train mode does drop on the adapter path


def test_projection_gradients_are_zero_while_lambda_b_is_zero():
    layer = _adapter()
    x = torch.randn(6, IN)
    layer(x).pow(2).sum().backward()
    assert torch.equal(layer.lora_A.grad, torch.zeros_like(layer.lora_A))
    assert torch.equal(layer.lora_B.grad, torch.zeros_like(layer.lora_B))
    assert torch.equal(layer.lambda_d.grad, torch.zeros_like(layer.lambda_d))
    assert layer.lambda_b.grad.abs().sum() > 0  # Λb is what moves first
    assert layer.base.weight.grad is None

    # once Λb is nonzero, A and B receive gradient
    layer.zero_grad()
    _randomise_vectors(layer)
    layer(x).pow(2).sum().backward()
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0


def _explicit(layer: AdapterLinear, x: torch.Tensor, x_a: torch.Tensor) -> torch.Tensor:
    """Eq. 1 written with plain autograd ops (adapter input `x_a`), to compare with the fused path."""
    base = layer.base
    low = (x_a @ layer.lora_A.T) * layer.lambda_d
    return x @ base.weight.T + base.bias + (low @ layer.lora_B.T) * layer.lambda_b


# 6 rows take the thin strategy and 64 the merged one, whichever factors train (see the test below)
PATHS = {"thin path": (0.0, (2, 3)), "merged-weight path": (0.0, (8, 8)), "dropout path": (0.5, (8, 8))}


def test_merging_is_cheaper_at_the_hand_computed_break_even():
    # MiniLM's FFN input layer, 384 -> 1536. Inference: rows·(384 + 1536) >= 384·1536 from 307.2 rows on.
    assert not merging_is_cheaper(307, 384, 1536, need_x=False, need_a=False, need_up=False)
    assert merging_is_cheaper(308, 384, 1536, need_x=False, need_a=False, need_up=False)
    # Training with A and B frozen (Λ's train): 2·rows·(384 + 1536) >= 2·384·1536 + rows·384 from 341.3 rows on.
    assert not merging_is_cheaper(341, 384, 1536, need_x=True, need_a=False, need_up=True)
    assert merging_is_cheaper(342, 384, 1536, need_x=True, need_a=False, need_up=True)
    # A trains too (its bottleneck gradient is needed anyway): rows·(2·384 + 1536) >= 2·384·1536 + rows·384
    # from 614.4 rows on.
    assert not merging_is_cheaper(614, 384, 1536, need_x=True, need_a=True, need_up=True)
    assert merging_is_cheaper(615, 384, 1536, need_x=True, need_a=True, need_up=True)


@pytest.mark.parametrize("path", PATHS)
def test_fused_path_gradients_equal_plain_autograd_of_eq1(path: str):
    dropout, lead = PATHS[path]
    layer = _adapter(dropout=dropout).double().train()
    _randomise_vectors(layer)
    for frozen in ((), ("lora_A",), ("lora_A", "lora_B")):
        for name in ("lora_A", "lora_B"):
            getattr(layer, name).requires_grad_(name not in frozen)
        params = [p for p in (layer.lora_A, layer.lora_B, layer.lambda_d, layer.lambda_b) if p.requires_grad]
        x = torch.randn(*lead, IN, dtype=torch.float64, requires_grad=True)
        torch.manual_seed(5)
        out = layer(x)
        assert out.grad_fn.merged == (path == "merged-weight path")  # the node is its own context
        torch.manual_seed(5)  # the same dropout mask for the plain expression
        x_a = nn.functional.dropout(x, dropout, training=True) if dropout else x
        expected_out = _explicit(layer, x, x_a)
        upstream = torch.randn_like(out)
        got = torch.autograd.grad(out, [x, *params], upstream)
        expected = torch.autograd.grad(expected_out, [x, *params], upstream)
        torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_fused_path_passes_gradcheck():
    layer = _adapter().double()
    _randomise_vectors(layer)
    x = torch.randn(2, IN, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


# ---- GPT-2's Conv1D (weight stored in × out) ------------------------------------------------------------------


def _conv1d_pair(seed: int = 0) -> tuple[AdapterLinear, AdapterLinear]:
    """The same adapter around a Conv1D and around the equivalent nn.Linear (weight transposed), in float64."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(seed)
    conv = Conv1D(OUT, IN).double()
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    linear = nn.Linear(IN, OUT).double()
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    around_conv, around_linear = AdapterLinear(conv, RANK), AdapterLinear(linear, RANK)
    _randomise_vectors(around_conv)
    with torch.no_grad():
        for name in ("lora_A", "lora_B", "lambda_d", "lambda_b"):
            getattr(around_linear, name).copy_(getattr(around_conv, name))
    return around_conv, around_linear


def test_conv1d_adapter_computes_eq1_like_the_equivalent_linear():
    around_conv, around_linear = _conv1d_pair()
    assert around_conv.transposed and around_conv.base.weight.shape == (IN, OUT)
    assert (around_conv.in_features, around_conv.out_features) == (IN, OUT)
    x = torch.randn(3, 5, IN, dtype=torch.float64)
    y = around_conv(x)
    assert torch.allclose(y, around_linear(x), atol=1e-12, rtol=0)
    w0, b = around_conv.base.weight.detach().t(), around_conv.base.bias.detach()  # W0 as out × in
    expected = x @ w0.T + b + x @ around_conv.delta_weight().detach().T
    assert torch.allclose(y, expected, atol=1e-12, rtol=0)


def test_conv1d_adapter_gradients_match_plain_autograd_of_eq1():
    around_conv, _ = _conv1d_pair(1)
    for param in (around_conv.base.weight, around_conv.base.bias):
        param.requires_grad_(True)  # the fused node's W0 and bias gradients are checked too
    x = torch.randn(4, 6, IN, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(4, 6, OUT, dtype=torch.float64)
    params = [
        x,
        around_conv.base.weight,
        around_conv.base.bias,
        *(getattr(around_conv, n) for n in ("lora_A", "lora_B", "lambda_d", "lambda_b")),
    ]
    ours = torch.autograd.grad(around_conv(x), params, grad_out)
    A, B, Ld, Lb = around_conv.lora_A, around_conv.lora_B, around_conv.lambda_d, around_conv.lambda_b
    plain = x @ around_conv.base.weight + around_conv.base.bias + ((x @ A.T) * Ld) @ B.T * Lb
    expected = torch.autograd.grad(plain, params, grad_out)
    for name, got, want in zip(["x", "W0", "bias", "A", "B", "Λd", "Λb"], ours, expected, strict=True):
        assert torch.allclose(got, want, atol=1e-10, rtol=1e-10), name


def test_conv1d_merge_adds_the_transposed_delta_and_keeps_the_output():
    around_conv, _ = _conv1d_pair(2)
    x = torch.randn(7, IN, dtype=torch.float64)
    with torch.no_grad():
        before_weight = around_conv.base.weight.clone()
        unmerged = around_conv(x)
        around_conv.merge()
        assert torch.allclose(around_conv.base.weight, before_weight + around_conv.delta_weight().T, atol=1e-12)
        assert torch.allclose(around_conv(x), unmerged, atol=1e-12, rtol=0)
        around_conv.unmerge()
        assert torch.allclose(around_conv.base.weight, before_weight, atol=1e-12)


def test_peft_export_of_a_gpt2_checkpoint_sets_fan_in_fan_out_and_gives_the_same_logits(tmp_path):
    import json

    from peft import PeftModel
    from text_runs import lm_recipe, review_files
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
    from typer.testing import CliRunner

    from aflora_cli.adapted.loading import load_checkpoint
    from aflora_cli.cli import app
    from aflora_cli.recipe import parse_recipe
    from aflora_cli.training.trainer import Trainer
    from tiny_lm import save_model_dir, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    base_dir = save_model_dir(GPT2LMHeadModel(config), tokenizer, tmp_path / "gpt2")
    raw = lm_recipe(tmp_path / "run", "llama", review_files(tmp_path / "data", train=8, validation=4))
    raw["model"]["name_or_path"] = str(base_dir)
    raw["training"] |= {"max_steps": 2, "lr": 5e-2}
    trainer = Trainer(parse_recipe(raw, "test"))
    trainer.prepare()
    trainer.train()
    trainer.close()
    out = tmp_path / "peft"
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "run" / "last"), "--out", str(out), "--format", "peft"])
    assert result.exit_code == 0, result.output
    exported = json.loads((out / "adapter_config.json").read_text())
    assert exported["fan_in_fan_out"] is True and exported["task_type"] == "CAUSAL_LM"
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out).eval()
    adapted = load_checkpoint(tmp_path / "run" / "last").adapted
    ids = torch.tensor([tokenizer.encode("Review: a warm and funny film\nSentiment:")])
    with torch.no_grad():  # float64, as for the other PEFT comparisons: left is the float32 export's rounding
        ours = adapted.model.double().eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(base_dir).double()(input_ids=ids).logits
        theirs = peft_model.double()(input_ids=ids).logits
    assert (ours - base).abs().max() > 1e-4  # two steps moved the model
    assert (ours - theirs).abs().max() < 1e-5 * max(1.0, float(ours.abs().max()))


def test_fixed_adapters_give_the_same_outputs_bit_for_bit() -> None:
    """Evaluation forms W0 + up·A once per split; the outputs equal the per-batch merged path exactly."""
    from aflora_cli.engine.config import AdapterConfig
    from aflora_cli.engine.inject import adapter_modules, inject_adapters
    from aflora_cli.engine.layer import fixed_adapters
    from tiny_models import tiny_bert

    model = tiny_bert()
    inject_adapters(model, AdapterConfig(method="aflora", rank=4))
    with torch.no_grad():
        for module in adapter_modules(model).values():
            module.lambda_b.normal_()  # a trained adapter: the path is not zero
    ids = torch.randint(0, 100, (64, 40))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with fixed_adapters(model):
            assert all(m.fixed_weight is not None for m in adapter_modules(model).values())
            fixed = model(input_ids=ids).logits
            few_rows = model(input_ids=ids[:1, :3]).logits  # few rows: the thin path, as without the context
    assert torch.equal(fixed, expected) and not torch.equal(expected, torch.zeros_like(expected))
    with torch.no_grad():
        assert torch.equal(few_rows, model(input_ids=ids[:1, :3]).logits)
    assert all(m.fixed_weight is None for m in adapter_modules(model).values())
