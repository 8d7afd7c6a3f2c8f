"""`aflora merge --format gguf`: the merged model as one GGUF file for llama.cpp, Ollama, LM Studio.

Written with the `gguf` package (the `aflora[gguf]` extra): `GGUFWriter` for the file, `get_tensor_name_map`
for the tensor names llama.cpp expects (`blk.N.attn_q.weight`, ...), `quants` for bf16 and q8_0. What goes in:

- hyper-parameters under the architecture's keys (`llama.block_count`, `llama.rope.freq_base`, ...);
- the weights of the merged model (adapters folded into W0 in fp32 first): 1-D tensors (norms, biases) stay
  f32; 2-D ones take `--gguf-type` (f32, f16, bf16, or q8_0 where a row is a whole number of 32-value blocks,
  else f16). LLaMA's query and key rows are reordered into llama.cpp's rotary layout (pairs of neighbouring
  rows instead of two halves), which readers of the file undo; a tied output layer is left out, as llama.cpp
  expects;
- the tokenizer of the checkpoint: a byte-level BPE vocabulary (LLaMA 3, Qwen, SmolLM2, ...) as llama.cpp's
  `gpt2` model (with the pre-tokenizer's name where the tokenizer's split rules tell it), a BPE vocabulary with
  byte fallback (LLaMA 2, Mistral v0.1-0.3: sentencepiece's) as its `llama` model, each piece scored minus the
  rank of the merge that makes it; then token types (special tokens as control tokens), merges, special token
  ids, whether BOS is added and the chat template.

Families it writes: LLaMA (and SmolLM2, Mistral, which llama.cpp reads as LLaMA), Qwen2, Qwen3 and Gemma 2
(norm weights stored as 1 + w, logit soft-capping and the sliding window as keys).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from aflora_cli.errors import AfloraError

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_GGUF_TYPE = "f16"
INSTALL_HINT = "pip install 'aflora[gguf]'"


@dataclass(frozen=True)
class Family:
    """How one transformers model type is written: llama.cpp's architecture name and its quirks."""

    arch: str  # llama.cpp's architecture name
    permute_qk: bool  # LLaMA-style rotary layout: query/key rows interleaved per head
    key_length: bool  # write attention.key_length / value_length (head_dim may differ from hidden/heads)
    norm_plus_one: bool = False  # Gemma's RMSNorm scales by 1 + w; llama.cpp stores 1 + w


FAMILIES = {
    "llama": Family("llama", permute_qk=True, key_length=False),
    "mistral": Family("llama", permute_qk=True, key_length=False),
    "qwen2": Family("qwen2", permute_qk=False, key_length=False),
    "qwen3": Family("qwen3", permute_qk=False, key_length=True),
    "gemma2": Family("gemma2", permute_qk=False, key_length=True, norm_plus_one=True),
}
SUPPORTED = "LLaMA (SmolLM2, LLaMA 2/3), Mistral, Qwen2, Qwen3 and Gemma 2 causal LMs"


def gguf_file_name(gguf_type: str) -> str:
    return f"model-{gguf_type}.gguf"


def check_installed() -> None:
    """The gguf package, before anything loads: else one line naming the extra."""
    _gguf()


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise AfloraError(f"--format gguf needs the gguf package; run {INSTALL_HINT}") from None
    return gguf


def family_of(model: nn.Module) -> Family:
    """The model's family, or one line saying what the export can write."""
    config: Any = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(str(model_type))
    if family is None or not type(model).__name__.endswith("ForCausalLM"):
        raise AfloraError(f"--format gguf: cannot write a {type(model).__name__} ({model_type}); it writes {SUPPORTED}")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type != "default":
        raise AfloraError(f"--format gguf: rope scaling {rope_type!r} is not written; it writes {SUPPORTED} without it")
    if (getattr(config, "attention_bias", False) and family.arch == "llama") or getattr(config, "mlp_bias", False):
        raise AfloraError(f"--format gguf: LLaMA layers with biases are not written; it writes {SUPPORTED}")
    if family.arch == "gemma2" and config.query_pre_attn_scalar != config.head_dim:
        # llama.cpp scales Gemma 2's queries by 1/sqrt(head_dim) (27B aside); another scalar would change the model
        raise AfloraError(
            f"--format gguf: Gemma 2 with query_pre_attn_scalar {config.query_pre_attn_scalar} != head_dim "
            f"{config.head_dim} is not written; it writes {SUPPORTED}"
        )
    return family


def _rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def interleave_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """Per head, rows [first half; second half] -> [h0, s0, h1, s1, ...]: transformers' rotary layout (rotate
    half) to llama.cpp's (rotate neighbouring pairs)."""
    rows = weight.shape[0]
    per_head = rows // heads
    split = weight.reshape(heads, 2, per_head // 2, *weight.shape[1:])
    return np.ascontiguousarray(split.swapaxes(1, 2).reshape(weight.shape))


# ------------------------------------------------------------------------------------------------- tokenizer

# pre-tokenizer names llama.cpp knows, told apart by the tokenizer's own split rules
_PRE_BY_SPLIT = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "llama-bpe",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "qwen2",
}


def pre_tokenizer_name(spec: dict[str, Any]) -> str | None:
    """llama.cpp's name for the tokenizer.json's pre-tokenizer, or None when it is not one we can tell."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds and kinds[0] == "Split":
        return _PRE_BY_SPLIT.get(str((steps[0].get("pattern") or {}).get("Regex")))
    return None


def _byte_level(spec: dict[str, Any]) -> bool:
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    return model.get("type") == "BPE" and not model.get("byte_fallback") and decoder.get("type") == "ByteLevel"


def _sentencepiece_like(spec: dict[str, Any]) -> bool:
    """BPE over `▁`-marked pieces with byte fallback: LLaMA 2's, Mistral's (v0.1-0.3), TinyLlama's."""
    model = spec.get("model") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def _prepends_space(spec: dict[str, Any]) -> bool:
    """Whether the tokenizer puts `▁` before the text (Metaspace's prepend scheme, or a Prepend normalizer)."""
    parts = [spec.get("pre_tokenizer") or {}, spec.get("normalizer") or {}]
    steps = [step for part in parts for step in (part.get("pretokenizers") or part.get("normalizers") or [part])]
    for step in steps:
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never"
        if step.get("type") == "Prepend":
            return True
    return False


def _merge_ranks(merges: list[str]) -> dict[str, int]:
    """The rank of the merge that first makes each token: a sentencepiece vocabulary's score is minus it."""
    ranks: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        ranks.setdefault(merge.replace(" ", ""), rank)
    return ranks


def add_tokenizer(writer: Any, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """The tokenizer, padded to the model's vocab_size: a byte-level BPE vocabulary as llama.cpp's `gpt2` model,
    a sentencepiece-style one (byte fallback) as its `llama` model with scores from the merge order."""
    gguf = _gguf()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise AfloraError("--format gguf: the checkpoint's tokenizer has no tokenizer.json (a fast tokenizer)")
    spec = json.loads(backend.to_str())
    byte_level = _byte_level(spec)
    if not byte_level and not _sentencepiece_like(spec):
        raise AfloraError(
            "--format gguf: only BPE tokenizers, byte-level (LLaMA 3, Qwen, SmolLM2) or with byte fallback (LLaMA 2, "
            f"Mistral) are written; this one is {spec.get('model', {}).get('type')} with "
            f"{spec.get('decoder', {}).get('type')} decoding"
        )
    by_id = {index: token for token, index in backend.get_vocab(with_added_tokens=True).items()}
    if by_id and max(by_id) >= vocab_size:
        raise AfloraError(f"--format gguf: the tokenizer has ids up to {max(by_id)}, the model {vocab_size} rows")
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in spec["model"].get("merges", [])]
    ranks = _merge_ranks(merges)
    added = dict(tokenizer.added_tokens_decoder.items())
    kinds = gguf.TokenType
    tokens, types, scores = [], [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(kinds.UNUSED)
        else:
            tokens.append(token)
            if index in added:
                types.append(kinds.CONTROL if added[index].special else kinds.USER_DEFINED)
            elif not byte_level and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                types.append(kinds.BYTE)
            else:
                types.append(kinds.NORMAL)
        scores.append(-float(ranks[token]) if token in ranks else 0.0)
    if byte_level:
        writer.add_tokenizer_model("gpt2")
        pre = pre_tokenizer_name(spec)
        if pre is not None:
            writer.add_tokenizer_pre(pre)
    else:
        writer.add_tokenizer_model("llama")
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(_prepends_space(spec))
    writer.add_token_list(tokens)
    writer.add_token_types([int(kind) for kind in types])
    writer.add_token_merges(merges)
    ids: dict[str, Callable[[int], None]] = {
        "bos_token_id": writer.add_bos_token_id,
        "eos_token_id": writer.add_eos_token_id,
        "unk_token_id": writer.add_unk_token_id,
        "pad_token_id": writer.add_pad_token_id,
    }
    for attribute, add in ids.items():
        value = getattr(tokenizer, attribute, None)
        if isinstance(value, int):
            add(value)
    encoded = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(encoded) and encoded[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(encoded) and encoded[-1] == tokenizer.eos_token_id)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


# --------------------------------------------------------------------------------------------------- weights


def _tensor_type(gguf: Any, gguf_type: str, array: np.ndarray) -> Any:
    kinds = gguf.GGMLQuantizationType
    if array.ndim < 2 or gguf_type == "f32":
        return kinds.F32
    if gguf_type == "q8_0":
        block = gguf.GGML_QUANT_SIZES[kinds.Q8_0][0]
        return kinds.Q8_0 if array.shape[-1] % block == 0 else kinds.F16
    return {"f16": kinds.F16, "bf16": kinds.BF16}[gguf_type]


def _file_type(gguf: Any, gguf_type: str) -> int:
    kinds = gguf.LlamaFileType
    return int(
        {"f32": kinds.ALL_F32, "f16": kinds.MOSTLY_F16, "bf16": kinds.MOSTLY_BF16, "q8_0": kinds.MOSTLY_Q8_0}[gguf_type]
    )


def add_hyperparameters(writer: Any, config: Any, family: Family) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if family.key_length or head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if family.arch == "gemma2":
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping or 0.0))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping or 0.0))
        writer.add_sliding_window(config.sliding_window)


def add_weights(writer: Any, model: nn.Module, family: Family, gguf_type: str) -> None:
    gguf = _gguf()
    config: Any = model.config
    arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == family.arch)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp uses the token embeddings when the file has no output layer
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise AfloraError(f"--format gguf: no GGUF name for the {family.arch} tensor {name}")
        array = tensor.detach().to(torch.float32).cpu().numpy()
        if family.permute_qk and target.endswith(("attn_q.weight", "attn_k.weight")):
            array = interleave_rotary(array, heads if ".attn_q." in target else kv_heads)
        if family.norm_plus_one and target.endswith("norm.weight"):
            array = array + 1.0
        kind = _tensor_type(gguf, gguf_type, array)
        data = gguf.quants.quantize(array, kind)
        raw_dtype = None if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else kind
        writer.add_tensor(target, data, raw_dtype=raw_dtype)


def write_gguf(model: nn.Module, tokenizer: PreTrainedTokenizerBase, path: Path, gguf_type: str, name: str) -> Path:
    """Write `model` (merged, any dtype: written from fp32) with `tokenizer` as one GGUF file at `path`."""
    if gguf_type not in GGUF_TYPES:
        raise AfloraError(f"--gguf-type {gguf_type}: expected one of {', '.join(GGUF_TYPES)}")
    gguf = _gguf()
    family = family_of(model)
    config: Any = model.config
    writer = gguf.GGUFWriter(str(path), family.arch)
    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(_file_type(gguf, gguf_type))
    if gguf_type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hyperparameters(writer, config, family)
    add_tokenizer(writer, tokenizer, config.vocab_size)
    add_weights(writer, model, family, gguf_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
