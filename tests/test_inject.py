"""Which layers get adapters, of what kind, how their PMs train, and how many parameters that makes."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from aflora_cli.engine.config import AdapterConfig
from aflora_cli.engine.inject import (
    adapter_modules,
    adaptive_matrices,
    find_targets,
    head_parameter_names,
    inject_adapters,
    unfreeze_head,
)
from aflora_cli.engine.layer import AdapterLinear
from aflora_cli.engine.params import count_trainable
from aflora_cli.errors import AfloraError
from tiny_models import (
    HIDDEN,
    INTERMEDIATE,
    LAYERS,
    LLAMA_HEADS,
    LLAMA_KV_HEADS,
    NUM_LABELS,
    sample_batch,
    tiny_bert,
    tiny_deberta,
    tiny_llama,
    tiny_roberta,
)

R = 4


def _kinds(targets) -> dict[str, str]:
    return {t.name: t.kind for t in targets}


def _expected(prefix: str, per_layer: dict[str, str]) -> dict[str, str]:
    return {f"{prefix}.{i}.{suffix}": kind for i in range(LAYERS) for suffix, kind in per_layer.items()}


ENCODER_LAYER = {
    "attention.self.query": "attention",
    "attention.self.key": "attention",
    "attention.self.value": "attention",
    "attention.output.dense": "attention",
    "intermediate.dense": "ffn",
    "output.dense": "ffn",
}
DEBERTA_LAYER = {
    "attention.self.query_proj": "attention",
    "attention.self.key_proj": "attention",
    "attention.self.value_proj": "attention",
    "attention.output.dense": "attention",
    "intermediate.dense": "ffn",
    "output.dense": "ffn",
}
LLAMA_LAYER = {
    "self_attn.q_proj": "attention",
    "self_attn.k_proj": "attention",
    "self_attn.v_proj": "attention",
    "self_attn.o_proj": "attention",
    "mlp.gate_proj": "ffn",
    "mlp.up_proj": "ffn",
    "mlp.down_proj": "ffn",
}


@pytest.mark.parametrize(
    "build, expected",
    [
        (tiny_bert, _expected("bert.encoder.layer", ENCODER_LAYER)),
        (tiny_roberta, _expected("roberta.encoder.layer", ENCODER_LAYER)),
        (tiny_deberta, _expected("deberta.encoder.layer", DEBERTA_LAYER)),
        (tiny_llama, _expected("model.layers", LLAMA_LAYER)),
    ],
    ids=["bert", "roberta", "deberta-v2", "llama"],
)
def test_default_targets_and_kinds(build, expected):
    model = build()
    targets = inject_adapters(model, AdapterConfig())
    assert _kinds(targets) == expected
    # the pooler / classifier / score linears are not adapted
    assert set(adapter_modules(model)) == set(expected)
    for _name, module in adapter_modules(model).items():
        assert isinstance(module, AdapterLinear) and module.rank == R


def test_bert_attention_output_dense_is_attention_and_layer_output_dense_is_ffn():
    kinds = _kinds(find_targets(tiny_bert(), AdapterConfig()))
    assert kinds["bert.encoder.layer.0.attention.output.dense"] == "attention"
    assert kinds["bert.encoder.layer.0.output.dense"] == "ffn"
    assert "bert.pooler.dense" not in kinds


@pytest.mark.parametrize("build", [tiny_bert, tiny_roberta, tiny_deberta, tiny_llama])
@pytest.mark.parametrize("method", ["aflora", "lora", "elora"])
def test_fresh_injected_model_gives_identical_logits(build, method):
    model = build()
    base = copy.deepcopy(model)
    inject_adapters(model, AdapterConfig(method=method))
    batch = sample_batch()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base(**batch).logits)


def test_user_targets_by_suffix():
    cfg = AdapterConfig(targets={"attention": ["self.query"], "ffn": ["intermediate.dense"]})
    kinds = _kinds(find_targets(tiny_bert(), cfg))
    assert kinds == {
        "bert.encoder.layer.0.attention.self.query": "attention",
        "bert.encoder.layer.1.attention.self.query": "attention",
        "bert.encoder.layer.0.intermediate.dense": "ffn",
        "bert.encoder.layer.1.intermediate.dense": "ffn",
    }


def test_suffix_matches_whole_name_components_only():
    with pytest.raises(AfloraError):
        find_targets(tiny_bert(), AdapterConfig(targets={"attention": ["uery"]}))


def test_user_targets_by_regex():
    cfg = AdapterConfig(targets={"ffn": [r"re:bert\.encoder\.layer\.1\..*dense"]})
    kinds = _kinds(find_targets(tiny_bert(), cfg))
    assert kinds == {
        "bert.encoder.layer.1.attention.output.dense": "ffn",
        "bert.encoder.layer.1.intermediate.dense": "ffn",
        "bert.encoder.layer.1.output.dense": "ffn",
    }
    # a regex must match the full name, not a part of it
    with pytest.raises(AfloraError):
        find_targets(tiny_bert(), AdapterConfig(targets={"ffn": ["re:layer"]}))


def test_attention_wins_where_both_kinds_match():
    cfg = AdapterConfig(targets={"attention": ["attention.output.dense"], "ffn": ["output.dense"]})
    kinds = _kinds(find_targets(tiny_bert(), cfg))
    assert kinds["bert.encoder.layer.0.attention.output.dense"] == "attention"
    assert kinds["bert.encoder.layer.0.output.dense"] == "ffn"
    assert len(kinds) == 2 * LAYERS


def test_no_match_lists_the_linear_layers():
    with pytest.raises(AfloraError) as info:
        inject_adapters(tiny_bert(), AdapterConfig(targets={"attention": ["q_proj"], "ffn": ["fc1"]}))
    message = str(info.value)
    assert "q_proj" in message and "fc1" in message
    for name in ("attention.self.query", "attention.self.value", "intermediate.dense", "pooler.dense", "classifier"):
        assert name in message


def test_unknown_model_type_without_targets():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(AfloraError, match=r"adapter\.targets"):
        find_targets(model, AdapterConfig())
    model.config = SimpleNamespace(model_type="mystery-net")
    with pytest.raises(AfloraError, match="mystery-net"):
        find_targets(model, AdapterConfig())
    # with explicit targets the same model is fine
    targets = inject_adapters(model, AdapterConfig(targets={"ffn": ["0", "2"]}))
    assert _kinds(targets) == {"0": "ffn", "2": "ffn"}
    assert isinstance(model[0], AdapterLinear) and isinstance(model[2], AdapterLinear)


def _adapters_by_kind(model, targets):
    modules = adapter_modules(model)
    kinds = _kinds(targets)
    return (
        [m for n, m in modules.items() if kinds[n] == "attention"],
        [m for n, m in modules.items() if kinds[n] == "ffn"],
    )


def test_aflora_policy():
    model = tiny_bert()
    targets = inject_adapters(model, AdapterConfig(method="aflora"))
    attention, ffn = _adapters_by_kind(model, targets)
    assert len(attention) == 4 * LAYERS and len(ffn) == 2 * LAYERS
    for module in attention:
        assert not module.lora_A.requires_grad and not module.lora_B.requires_grad
        assert module.lambda_d.requires_grad and module.lambda_b.requires_grad
    for module in ffn:
        assert module.lora_A.requires_grad and module.lora_B.requires_grad
        assert module.lambda_d.requires_grad and module.lambda_b.requires_grad
    assert {t.policy for t in targets if t.kind == "attention"} == {"frozen"}
    assert {t.policy for t in targets if t.kind == "ffn"} == {"adaptive"}
    pms = adaptive_matrices(model, targets)
    assert set(pms) == {
        f"bert.encoder.layer.{i}.{m}.lora_{x}"
        for i in range(LAYERS)
        for m in ("intermediate.dense", "output.dense")
        for x in "AB"
    }
    params = dict(model.named_parameters())
    assert all(pms[name] is params[name] for name in pms)
    # everything that is not adapter is frozen, the head too until unfreeze_head
    for name, param in model.named_parameters():
        if not any(name.endswith(s) for s in (".lora_A", ".lora_B", ".lambda_d", ".lambda_b")):
            assert not param.requires_grad, name


def test_lora_policy():
    model = tiny_bert()
    targets = inject_adapters(model, AdapterConfig(method="lora"))
    for module in adapter_modules(model).values():
        assert module.lambda_d is None and module.lambda_b is None
        assert module.lora_A.requires_grad and module.lora_B.requires_grad
        assert torch.equal(module.lora_B.detach(), torch.zeros_like(module.lora_B))
        assert module.scaling == 1.0  # alpha defaults to r for lora
    assert adaptive_matrices(model, targets) == {}
    model = tiny_bert()
    inject_adapters(model, AdapterConfig(method="lora", rank=4, alpha=16))
    assert all(m.scaling == 4.0 for m in adapter_modules(model).values())


def test_elora_policy():
    model = tiny_bert()
    targets = inject_adapters(model, AdapterConfig(method="elora"))
    for module in adapter_modules(model).values():
        assert not module.lora_A.requires_grad and not module.lora_B.requires_grad
        assert module.lambda_d.requires_grad and module.lambda_b.requires_grad
    assert adaptive_matrices(model, targets) == {}


def test_policy_override():
    model = tiny_bert()
    targets = inject_adapters(model, AdapterConfig(method="aflora", policy={"attention": "adaptive"}))
    assert {t.policy for t in targets} == {"adaptive"}
    assert len(adaptive_matrices(model, targets)) == 2 * 6 * LAYERS


@pytest.mark.parametrize(
    "build, expected",
    [
        (tiny_bert, ["classifier.weight", "classifier.bias"]),
        (
            tiny_roberta,
            [
                "classifier.dense.weight",
                "classifier.dense.bias",
                "classifier.out_proj.weight",
                "classifier.out_proj.bias",
            ],
        ),
        (tiny_deberta, ["pooler.dense.weight", "pooler.dense.bias", "classifier.weight", "classifier.bias"]),
        (tiny_llama, ["score.weight"]),
    ],
    ids=["bert", "roberta", "deberta-v2", "llama"],
)
def test_head_parameter_names(build, expected):
    model = build()
    inject_adapters(model, AdapterConfig())
    assert sorted(head_parameter_names(model)) == sorted(expected)
    assert sorted(unfreeze_head(model)) == sorted(expected)
    params = dict(model.named_parameters())
    assert all(params[name].requires_grad for name in expected)


# ---- counts from the config sizes ------------------------------------------------------------------


def _module_count(method: str, kind: str, fan_in: int, fan_out: int) -> int:
    vectors = R + fan_out
    matrices = R * fan_in + fan_out * R
    if method == "lora":
        return matrices
    if method == "elora":
        return vectors
    return vectors + (matrices if kind == "ffn" else 0)  # aflora, before anything freezes


def _encoder_shapes() -> list[tuple[str, int, int]]:
    H, I = HIDDEN, INTERMEDIATE
    return [("attention", H, H)] * 4 + [("ffn", H, I), ("ffn", I, H)]


def _llama_shapes() -> list[tuple[str, int, int]]:
    H, I = HIDDEN, INTERMEDIATE
    kv = LLAMA_KV_HEADS * (HIDDEN // LLAMA_HEADS)
    return [
        ("attention", H, H),  # q
        ("attention", H, kv),  # k
        ("attention", H, kv),  # v
        ("attention", H, H),  # o
        ("ffn", H, I),  # gate
        ("ffn", H, I),  # up
        ("ffn", I, H),  # down
    ]


HEAD_SIZES = {
    "bert": HIDDEN * NUM_LABELS + NUM_LABELS,
    "deberta-v2": (HIDDEN * HIDDEN + HIDDEN) + (HIDDEN * NUM_LABELS + NUM_LABELS),
    "llama": HIDDEN * NUM_LABELS,  # score has no bias
}


@pytest.mark.parametrize("method", ["aflora", "lora", "elora"])
@pytest.mark.parametrize(
    "arch, build, shapes",
    [
        ("bert", tiny_bert, _encoder_shapes()),
        ("deberta-v2", tiny_deberta, _encoder_shapes()),
        ("llama", tiny_llama, _llama_shapes()),
    ],
    ids=["bert", "deberta-v2", "llama"],
)
def test_count_trainable_matches_formula(arch, build, shapes, method):
    model = build()
    inject_adapters(model, AdapterConfig(method=method, rank=R))
    head = unfreeze_head(model)
    expected = LAYERS * sum(_module_count(method, kind, fan_in, fan_out) for kind, fan_in, fan_out in shapes)
    assert count_trainable(model, head) == (expected, expected + HEAD_SIZES[arch])


def test_count_trainable_aflora_bert_written_out():
    """The same count for aflora on BERT, spelled out as in the brief."""
    H, I, r = HIDDEN, INTERMEDIATE, R
    per_layer = 4 * (r + H) + (r + I + r * H + I * r) + (r + H + r * I + H * r)
    model = tiny_bert()
    inject_adapters(model, AdapterConfig(method="aflora", rank=r))
    without, with_head = count_trainable(model, head_parameter_names(model))
    assert without == with_head == LAYERS * per_layer  # head still frozen
    # r=4, H=32, I=48: attention 4·36, intermediate 4+48+128+192, output 4+32+192+128
    assert LAYERS * per_layer == 2 * (144 + 372 + 356)


def test_llama_kv_projection_shapes():
    model = tiny_llama()
    inject_adapters(model, AdapterConfig())
    modules = adapter_modules(model)
    k = modules["model.layers.0.self_attn.k_proj"]
    assert k.lora_B.shape == (16, R) and k.lambda_b.shape == (16,)
    assert modules["model.layers.0.self_attn.q_proj"].lora_B.shape == (HIDDEN, R)
    assert modules["model.layers.1.mlp.down_proj"].lora_A.shape == (R, INTERMEDIATE)


# ---- default targets of the newer causal architectures, built tiny from their configs ----------------------

TINY_DECODER = {
    "vocab_size": 100,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
}


def _tiny_causal(model_type: str, **config) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))


def _decoder_layers(prefix: str, per_layer: dict[str, str], layers: int = 2) -> dict[str, str]:
    return {f"{prefix}.{i}.{suffix}": kind for i in range(layers) for suffix, kind in per_layer.items()}


PHI3_LAYER = {
    "self_attn.qkv_proj": "attention",  # fused Q, K, V: one adapter
    "self_attn.o_proj": "attention",
    "mlp.gate_up_proj": "ffn",  # fused gate and up
    "mlp.down_proj": "ffn",
}
GPT2_LAYER = {"attn.c_attn": "attention", "attn.c_proj": "attention", "mlp.c_fc": "ffn", "mlp.c_proj": "ffn"}


GPT2_TINY = {"vocab_size": 100, "n_embd": 16, "n_layer": 2, "n_head": 2, "bos_token_id": 1, "eos_token_id": 1}


@pytest.mark.parametrize(
    "model_type, config, expected, count",
    [
        ("gemma", {"head_dim": 8, **TINY_DECODER}, _decoder_layers("model.layers", LLAMA_LAYER), 14),
        ("gemma2", {"head_dim": 8, **TINY_DECODER}, _decoder_layers("model.layers", LLAMA_LAYER), 14),
        ("gemma3_text", {"head_dim": 8, **TINY_DECODER}, _decoder_layers("model.layers", LLAMA_LAYER), 14),
        ("phi3", TINY_DECODER, _decoder_layers("model.layers", PHI3_LAYER), 8),
        ("gpt2", GPT2_TINY, _decoder_layers("transformer.h", GPT2_LAYER), 8),
    ],
    ids=["gemma", "gemma2", "gemma3_text", "phi3", "gpt2"],
)
def test_default_targets_of_newer_decoders(model_type, config, expected, count):
    model = _tiny_causal(model_type, **config)
    assert model.config.model_type == model_type
    targets = inject_adapters(model, AdapterConfig())
    assert _kinds(targets) == expected and len(targets) == count
    assert "lm_head" not in adapter_modules(model)


def test_gpt2_conv1d_layers_are_wrapped_with_their_out_by_in_shapes():
    from transformers.pytorch_utils import Conv1D

    model = _tiny_causal("gpt2", **GPT2_TINY)
    inject_adapters(model, AdapterConfig())
    modules = adapter_modules(model)
    c_attn, c_fc = modules["transformer.h.0.attn.c_attn"], modules["transformer.h.0.mlp.c_fc"]
    assert isinstance(c_attn.base, Conv1D) and c_attn.transposed
    assert c_attn.base.weight.shape == (16, 48)  # Conv1D stores in × out
    assert (c_attn.in_features, c_attn.out_features) == (16, 48)
    assert c_attn.lora_A.shape == (R, 16) and c_attn.lora_B.shape == (48, R)
    assert (c_fc.in_features, c_fc.out_features) == (16, 64)


def test_gemma3_multimodal_adapts_the_language_model_only():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = {key: value for key, value in TINY_DECODER.items() if key != "vocab_size"}
    config = Gemma3Config(
        text_config={"model_type": "gemma3_text", "vocab_size": 100, "head_dim": 8, **text},
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 14,
        },
        mm_tokens_per_image=4,
        boi_token_index=97,
        eoi_token_index=98,
        image_token_index=99,
    )
    model = Gemma3ForConditionalGeneration(config)
    vision_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "vision_tower" in n]
    assert any(n.endswith("self_attn.q_proj") for n in vision_linears)  # the tower has look-alike layers
    targets = inject_adapters(model, AdapterConfig())
    prefix = next(t.name for t in targets).split(".layers.")[0]
    assert prefix.endswith("language_model")
    assert _kinds(targets) == _decoder_layers(f"{prefix}.layers", LLAMA_LAYER)
    assert not any("vision" in name or "projector" in name for name in adapter_modules(model))
