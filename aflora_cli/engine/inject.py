"""Which linear layers get an adapter, of what kind, and how their projection matrices (PMs) train."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from torch import nn
from transformers.pytorch_utils import Conv1D

from aflora_cli.engine.layer import AdapterLinear
from aflora_cli.errors import AfloraError
from aflora_cli.recipe import AdapterConfig

Kind = Literal["attention", "ffn"]
Policy = Literal["trainable", "frozen", "adaptive"]
KindPatterns = dict[Kind, list[str]]

_ENCODER: KindPatterns = {
    "attention": ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"],
    "ffn": ["intermediate.dense", "output.dense"],
}
_DEBERTA: KindPatterns = {
    "attention": [
        "attention.self.query_proj",
        "attention.self.key_proj",
        "attention.self.value_proj",
        "attention.output.dense",
    ],
    "ffn": ["intermediate.dense", "output.dense"],
}
_LLAMA: KindPatterns = {
    "attention": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
    "ffn": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
}
# Gemma 3 with its vision tower: only the language model's layers (the tower has q_proj and fc1 of its own)
_GEMMA3: KindPatterns = {
    "attention": [r"re:.*language_model\.layers\.\d+\.self_attn\.[qkvo]_proj"],
    "ffn": [r"re:.*language_model\.layers\.\d+\.mlp\.(gate|up|down)_proj"],
}
_PHI3: KindPatterns = {  # fused projections: one adapter over Q, K and V, one over gate and up
    "attention": ["self_attn.qkv_proj", "self_attn.o_proj"],
    "ffn": ["mlp.gate_up_proj", "mlp.down_proj"],
}
_GPT2: KindPatterns = {  # Conv1D layers, weight stored in × out
    "attention": ["attn.c_attn", "attn.c_proj"],
    "ffn": ["mlp.c_fc", "mlp.c_proj"],
}
_BART: KindPatterns = {  # self-attention in both stacks and the decoder's cross-attention
    "attention": [r"re:.*\.(self_attn|encoder_attn)\.(q_proj|k_proj|v_proj|out_proj)"],
    "ffn": ["fc1", "fc2"],
}
_T5: KindPatterns = {  # SelfAttention in both stacks, EncDecAttention in the decoder; plain or gated FFN
    "attention": [r"re:.*\.(SelfAttention|EncDecAttention)\.[qkvo]"],
    "ffn": ["DenseReluDense.wi", "DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo"],
}
DEFAULT_TARGETS: dict[str, KindPatterns] = {
    "bert": _ENCODER,
    "roberta": _ENCODER,
    "xlm-roberta": _ENCODER,
    "deberta-v2": _DEBERTA,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    "gemma3": _GEMMA3,
    "phi3": _PHI3,
    "gpt2": _GPT2,
    "bart": _BART,
    "mbart": _BART,
    "pegasus": _BART,
    "t5": _T5,
    "mt5": _T5,
    "umt5": _T5,
}

LINEAR_TYPES = (nn.Linear, Conv1D)  # what an adapter can sit beside

METHOD_POLICY: dict[str, dict[Kind, Policy]] = {
    "aflora": {"attention": "frozen", "ffn": "adaptive"},
    "lora": {"attention": "trainable", "ffn": "trainable"},
    "elora": {"attention": "frozen", "ffn": "frozen"},
}


@dataclass(frozen=True)
class Target:
    """One adapted module: its path in the model, its layer kind and what its PMs do."""

    name: str
    kind: Kind
    policy: Policy


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def _pattern_summary(names: list[str]) -> str:
    """Linear-layer names with layer numbers folded to `*`, each once, for an error message."""
    folded = dict.fromkeys(re.sub(r"\.\d+\.", ".*.", name) for name in names)
    return ", ".join(folded)


def resolve_policy(cfg: AdapterConfig) -> dict[Kind, Policy]:
    """The method's PM policy per kind, with the recipe's `policy` entries on top."""
    return {**METHOD_POLICY[cfg.method], **(cfg.policy or {})}


def find_targets(model: nn.Module, cfg: AdapterConfig) -> list[Target]:
    """Every linear layer the recipe targets, classed by kind; attention wins where both kinds match."""
    patterns: Mapping[Kind, list[str]]
    if cfg.targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            known = ", ".join(sorted(DEFAULT_TARGETS))
            raise AfloraError(
                f"adapter.targets: no default targets for model type {model_type!r} (known: {known}); "
                "give adapter.targets.attention / adapter.targets.ffn"
            )
        patterns = DEFAULT_TARGETS[model_type]
    else:
        patterns = cfg.targets
    policy = resolve_policy(cfg)
    linears = [name for name, module in model.named_modules() if isinstance(module, LINEAR_TYPES)]
    targets = []
    kinds: tuple[Kind, ...] = ("attention", "ffn")
    for name in linears:
        kind = next((k for k in kinds if any(_matches(name, p) for p in patterns.get(k, []))), None)
        if kind is not None:
            targets.append(Target(name, kind, policy[kind]))
    if not targets:
        wanted = ", ".join(p for kind_patterns in patterns.values() for p in kind_patterns)
        raise AfloraError(
            f"adapter.targets: no linear layer matches {wanted}; the model's linear layers are: "
            f"{_pattern_summary(linears)}"
        )
    return targets


def inject_adapters(model: nn.Module, cfg: AdapterConfig) -> list[Target]:
    """Freeze the whole model, wrap every target in an AdapterLinear and set its PMs per policy."""
    for param in model.parameters():
        param.requires_grad_(False)
    targets = find_targets(model, cfg)
    vectors = cfg.method != "lora"
    alpha = cfg.alpha if cfg.alpha is not None else (cfg.rank if cfg.method == "lora" else None)
    scaling = alpha / cfg.rank if alpha is not None else 1.0
    for target in targets:
        parent_name, _, child = target.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        adapter = AdapterLinear(
            getattr(parent, child),
            cfg.rank,
            vectors=vectors,
            lambda_d_init=cfg.lambda_d_init,
            scaling=scaling,
            dropout=cfg.dropout,
            zero_b=cfg.method == "lora",
        )
        trainable = target.policy != "frozen"
        adapter.lora_A.requires_grad_(trainable)
        adapter.lora_B.requires_grad_(trainable)
        setattr(parent, child, adapter)
    return targets


def adapter_modules(model: nn.Module) -> dict[str, AdapterLinear]:
    """Every AdapterLinear in the model, by module path."""
    return {name: module for name, module in model.named_modules() if isinstance(module, AdapterLinear)}


def head_parameter_names(model: nn.Module) -> list[str]:
    """Parameters outside the pretrained backbone (`base_model_prefix`): the new task head."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or not hasattr(model, prefix):
        return []
    return [name for name, _ in model.named_parameters() if not name.startswith(prefix + ".")]


def unfreeze_head(model: nn.Module) -> list[str]:
    """Make the task head trainable; returns its parameter names."""
    names = head_parameter_names(model)
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(True)
    return names


def adaptive_matrices(model: nn.Module, targets: list[Target]) -> dict[str, nn.Parameter]:
    """The PMs under adaptive freezing, `<module>.lora_A` / `<module>.lora_B`, in model order."""
    modules = adapter_modules(model)
    out: dict[str, nn.Parameter] = {}
    for target in targets:
        if target.policy == "adaptive":
            out[f"{target.name}.lora_A"] = modules[target.name].lora_A
            out[f"{target.name}.lora_B"] = modules[target.name].lora_B
    return out
