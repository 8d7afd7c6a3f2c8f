"""Which linear layers get an adapter, of what kind, and how their projection matrices (PMs) train."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import yaml
from torch import nn
from transformers.pytorch_utils import Conv1D

from aflora_cli.engine.config import AdapterConfig
from aflora_cli.engine.layer import AdapterLinear, linear_features
from aflora_cli.errors import AfloraError

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


_BLOCK = re.compile(r"^(?:.*?\.)?\d+\.(.+)$")  # the first numbered module is the layer: keep what follows
_ATTENTION_WORDS = {
    *("q", "k", "v", "o", "qkv", "query", "key", "value"),
    *("attn", "attention", "out_proj", "self", "cross"),
}
_FFN_WORDS = {"fc", "mlp", "ffn", "intermediate", "dense", "wi", "wo", "up", "down", "gate", "experts"}
PASTE_MARKER = "paste: "


def guess_kind(suffix: str) -> Kind | None:
    """Attention or FFN from the words of a layer name; attention words win (`attention.output.dense`)."""
    parts = suffix.split(".")
    words = {word.rstrip("0123456789") for part in parts for word in part.split("_")} | set(parts)
    if words & _ATTENTION_WORDS:
        return "attention"
    if words & _FFN_WORDS:
        return "ffn"
    return None


def _shape(module: nn.Module) -> str:
    """`out×in` of a linear layer (Conv1D stores its weight the other way round, a quantized one packed)."""
    out_features, in_features = linear_features(module)
    return f"{out_features}×{in_features}"


def unknown_architecture_message(model: nn.Module, model_type: str | None) -> str:
    """One line for a model without default targets: its linear layers grouped by the name within a
    numbered block (with counts and shapes), and an `adapter.targets` block to paste, guessed from the names.

    Layers outside numbered blocks (embeddings' projections, pooler, task or LM head) are left out of the
    block: adapters belong in the repeated transformer layers, and a new head trains whole anyway.
    """
    groups: dict[str, dict[str, int]] = {}  # suffix -> shape -> count
    outside = []
    for name, module in model.named_modules():
        if not isinstance(module, LINEAR_TYPES):
            continue
        match = _BLOCK.match(name)
        if match is None:
            outside.append(name)
            continue
        suffix = re.sub(r"\.\d+\.", ".*.", "." + match.group(1) + ".").strip(".")
        shapes = groups.setdefault(suffix, {})
        shape = _shape(module)
        shapes[shape] = shapes.get(shape, 0) + 1
    head = f"adapter.targets: no default targets for model type {model_type!r}"
    give = "give adapter.targets.attention / adapter.targets.ffn as module-name suffixes or re:<regex>"
    if not groups:
        return f"{head}, and no linear layer sits in a numbered block (its linear layers: {', '.join(outside)}); {give}"
    snippet: dict[Kind, list[str]] = {"attention": [], "ffn": []}
    listing = []
    for suffix, shapes in groups.items():
        kind = guess_kind(suffix)
        pattern = suffix if "*" not in suffix else "re:.*\\." + re.escape(suffix).replace(r"\*", r"\d+")
        if kind is not None:
            snippet[kind].append(pattern)
        sizes = ", ".join(f"{count} of {shape}" for shape, count in shapes.items())
        listing.append(f"{suffix} ({sizes}{', kind not guessed, left out' if kind is None else ''})")
    layers = f"{head}; its linear layers by name within the numbered blocks: {'; '.join(listing)}"
    if outside:
        layers += f"; left out, outside the numbered blocks: {', '.join(outside)}"
    targets = {kind: patterns for kind, patterns in snippet.items() if patterns}
    if not targets:
        return f"{layers}; {give}"
    block = yaml.safe_dump({"targets": targets}, default_flow_style=True, sort_keys=False, width=1 << 30)
    return (
        f"{layers}. The attention/ffn split below is a guess from the names (it sets which PMs freeze): "
        f"check it, then {PASTE_MARKER}adapter: {block.strip()}"
    )


def resolve_policy(cfg: AdapterConfig) -> dict[Kind, Policy]:
    """The method's PM policy per kind, with the recipe's `policy` entries on top."""
    return {**METHOD_POLICY[cfg.method], **(cfg.policy or {})}


def find_targets(model: nn.Module, cfg: AdapterConfig) -> list[Target]:
    """Every linear layer the recipe targets, classed by kind; attention wins where both kinds match."""
    patterns: Mapping[Kind, list[str]]
    if cfg.targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise AfloraError(unknown_architecture_message(model, model_type))
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


def fold_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its W0 and put the plain layer back in its place: a model without aflora."""
    for name, module in adapter_modules(model).items():
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.base)
    return model


def head_parameter_names(model: nn.Module) -> list[str]:
    """Parameters outside the pretrained backbone (`base_model_prefix`): the new task head."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or not hasattr(model, prefix):
        return []
    return [name for name, _ in model.named_parameters() if not name.startswith(prefix + ".")]


def unfreeze_head(model: nn.Module) -> list[str]:
    """Make the task head trainable, in fp32 whatever the base is stored in; returns its parameter names."""
    names = head_parameter_names(model)
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(True)
    _head_in_fp32(model, names)
    return names


def _head_in_fp32(model: nn.Module, names: list[str]) -> None:
    """A head loaded in half precision trains in fp32 (as its optimizer state does): its modules are cast and
    take their input in fp32, so a bf16 backbone feeds it without autocast."""
    for top in dict.fromkeys(name.split(".")[0] for name in names):
        module = model.get_submodule(top)
        if any(p.dtype in (torch.bfloat16, torch.float16) for p in module.parameters()):
            module.float()
            module.register_forward_pre_hook(_inputs_to_fp32)


def _inputs_to_fp32(module: nn.Module, args: tuple[object, ...]) -> tuple[object, ...]:
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def adaptive_matrices(model: nn.Module, targets: list[Target]) -> dict[str, nn.Parameter]:
    """The PMs under adaptive freezing, `<module>.lora_A` / `<module>.lora_B`, in model order."""
    modules = adapter_modules(model)
    out: dict[str, nn.Parameter] = {}
    for target in targets:
        if target.policy == "adaptive":
            out[f"{target.name}.lora_A"] = modules[target.name].lora_A
            out[f"{target.name}.lora_B"] = modules[target.name].lora_B
    return out
