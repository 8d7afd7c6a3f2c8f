"""Batched, deterministic text generation whose output does not depend on the batch it ran in.

Evaluation generates for thousands of prompts, so it batches them; a score must still not change with the
batch size. `generate` therefore pads so that padding is invisible to the model (left padding with an
attention mask for decoder-only models, right padding of the encoder input for encoder-decoders), sorts
prompts by length so a batch carries little padding, and returns only the new tokens of each prompt, in
input order, cut at the first end-of-sequence token.

Decoding is greedy or beam search, never sampling. Every decoding setting is pinned here: a checkpoint's
`generation_config.json` often carries sampling flags, a `min_length` or its own beam settings, and
transformers fills any setting the caller leaves unset from it, so without pinning a checkpoint could
silently change how it is scored. Only token facts are taken from the model (its end-of-sequence ids, the
decoder start token, a forced first or last token), since they describe how it was trained to write.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from aflora_cli.errors import AfloraError


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode: greedy when `num_beams` is 1, beam search otherwise; never sampling.

    `length_penalty` is the beam-search exponent on the hypothesis length (1.0 = average log-probability per
    token; larger favours longer outputs) and is ignored by greedy decoding. `no_repeat_ngram_size` > 0 forbids
    any n-gram of that size from occurring twice in the model's sequence (for decoder-only models the prompt
    is part of that sequence, as in transformers).
    """

    max_new_tokens: int = 256
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise AfloraError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise AfloraError(f"num_beams must be at least 1 (1 = greedy), got {self.num_beams}")
        if self.no_repeat_ngram_size < 0:
            raise AfloraError(f"no_repeat_ngram_size must be 0 (off) or more, got {self.no_repeat_ngram_size}")


@dataclass(frozen=True)
class SpecialTokens:
    """The token ids generation needs, resolved once from the tokenizer and the model."""

    pad: int
    eos: tuple[int, ...]  # stopping on any of them; may be empty (then only max_new_tokens stops)
    bos: int | None
    decoder_start: int | None  # encoder-decoders only


def _ids(value: Any) -> list[int]:
    """A token id setting (None, an int or a list of ints) as a list."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(item) for item in value]


def _first(attribute: str, sources: Sequence[Any]) -> int | None:
    """The first source's `attribute` that is set."""
    for source in sources:
        value = getattr(source, attribute, None)
        if value is not None:
            return int(value)
    return None


def special_tokens(model: Any, tokenizer: PreTrainedTokenizerBase) -> SpecialTokens:
    """Pad, end-of-sequence, bos and decoder-start ids, each from the tokenizer first, then the model.

    End-of-sequence is the union of the tokenizer's eos and the model's (generation) config eos ids: chat
    checkpoints often end a turn with a token other than the tokenizer's eos and list it only in
    `generation_config.json`. Without a pad token, eos pads: padded positions are masked, so any id works.
    """
    own = getattr(model, "generation_config", None)
    sources = (tokenizer, own, model.config)
    eos: list[int] = []
    for source in sources:
        for token in _ids(getattr(source, "eos_token_id", None)):
            if token not in eos:
                eos.append(token)
    pad = _first("pad_token_id", sources)
    if pad is None:
        if not eos:
            raise AfloraError("the tokenizer and the model define neither a pad nor an end-of-sequence token")
        pad = eos[0]
    bos = _first("bos_token_id", sources)
    decoder_start = None
    if model.config.is_encoder_decoder:
        # transformers' own fallback: bos starts the decoder when no start token is configured.
        decoder_start = _first("decoder_start_token_id", (own, model.config))
        if decoder_start is None:
            decoder_start = bos
        if decoder_start is None:
            raise AfloraError("the encoder-decoder model defines neither decoder_start_token_id nor bos_token_id")
    return SpecialTokens(pad=pad, eos=tuple(eos), bos=bos, decoder_start=decoder_start)


def generation_config(model: Any, settings: GenerationSettings, tokens: SpecialTokens) -> GenerationConfig:
    """A complete GenerationConfig: `settings` plus token facts, nothing else inherited from the checkpoint.

    Pad is suppressed (unless it doubles as eos or a forced bos): it is not text, and a pad token generated
    mid-answer would look like padding to no-repeat-n-gram blocking in a left-padded batch, breaking batch
    independence.
    """
    own = getattr(model, "generation_config", None)
    forced_bos = getattr(own, "forced_bos_token_id", None)
    beams = settings.num_beams > 1
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        min_length=0,
        do_sample=False,
        num_beams=settings.num_beams,
        num_return_sequences=1,
        # Greedy decoding rejects beam-only flags with a warning, so they are set only for beam search.
        length_penalty=settings.length_penalty if beams else 1.0,
        early_stopping=False,
        no_repeat_ngram_size=settings.no_repeat_ngram_size,
        repetition_penalty=1.0,
        use_cache=True,
        pad_token_id=tokens.pad,
        eos_token_id=list(tokens.eos) or None,
        bos_token_id=tokens.bos,
        decoder_start_token_id=tokens.decoder_start,
        forced_bos_token_id=forced_bos,
        forced_eos_token_id=getattr(own, "forced_eos_token_id", None),
        # Never suppress a token that must be produced: every logit would be -inf.
        suppress_tokens=None if tokens.pad in (*tokens.eos, forced_bos) else [tokens.pad],
    )


def _batch_tensors(
    prompts: Sequence[Sequence[int]], pad: int, left: bool, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask, padded on the left (`left`) or the right to the longest prompt."""
    width = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        span = slice(width - len(prompt), width) if left else slice(0, len(prompt))
        ids[row, span] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, span] = 1
    return ids.to(device), mask.to(device)


def _cut(tokens: list[int], eos: tuple[int, ...]) -> list[int]:
    """Tokens before the first end-of-sequence token (all of them when none occurs)."""
    for position, token in enumerate(tokens):
        if token in eos:
            return tokens[:position]
    return tokens


def generate(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    settings: GenerationSettings,
    batch_size: int,
    device: torch.device | str,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """The new token ids for each prompt, in input order, without prompt, eos or anything after eos.

    `prompts` are token ids without padding (with whatever bos the tokenizer adds). For a decoder-only model a
    prompt is the start of the text to continue; for an encoder-decoder (`model.config.is_encoder_decoder`) it
    is the encoder input, and the decoder start token is dropped from the output; a bos the model generates
    or is forced to generate (BART's `forced_bos_token_id`) stays, so decode with `skip_special_tokens=True`.
    Pad never appears. Results equal generating each prompt alone, exactly in exact arithmetic; on a large
    model in half precision, rounding that differs with the padded shape can still flip a near-tied token.
    `on_batch(rows)` is called after each batch with the number of prompts it held (for a progress bar).
    The model runs in eval mode under `torch.no_grad()`; its training mode and generation config are restored.
    """
    if batch_size < 1:
        raise AfloraError(f"the generation batch size must be at least 1, got {batch_size}")
    if not callable(getattr(model, "generate", None)) or not model.can_generate():
        raise AfloraError(f"{type(model).__name__} cannot generate text (it has no language-model head)")
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise AfloraError(f"prompt {index} is empty: generation needs at least one input token")
    tokens = special_tokens(model, tokenizer)
    config = generation_config(model, settings, tokens)
    encoder_decoder = bool(model.config.is_encoder_decoder)
    # Longest first: a batch holds prompts of similar length, and an out-of-memory error shows at once.
    order = sorted(range(len(prompts)), key=lambda index: -len(prompts[index]))
    results: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    own_config = model.generation_config
    model.eval()
    # generate() fills every unset field from model.generation_config; swapping in our complete config
    # keeps checkpoint defaults out and avoids transformers' warnings about max_length set twice.
    model.generation_config = config
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = [prompts[row] for row in rows]
                input_ids, attention_mask = _batch_tensors(batch, tokens.pad, left=not encoder_decoder, device=device)
                sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
                # Decoder-only output repeats the (padded) prompt; encoder-decoder output starts with decoder start.
                new = sequences[:, 1:] if encoder_decoder else sequences[:, input_ids.shape[1] :]
                for row, generated in zip(rows, new.tolist()):
                    results[row] = _cut(generated, tokens.eos)
                if on_batch is not None:
                    on_batch(len(rows))
    finally:
        model.generation_config = own_config
        model.train(was_training)
    return results
