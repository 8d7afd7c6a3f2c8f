"""Batched generation equals one-by-one generation, token for token, on tiny LLaMA, BART and T5 models."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest
import torch
from transformers import GenerationConfig
from transformers.utils import logging as hf_logging

from aflora_cli.errors import AfloraError
from aflora_cli.tasks.generation import GenerationSettings, generate, special_tokens
from tiny_lm import corpus_sentences, tiny_bart, tiny_llama_lm, tiny_t5, tiny_tokenizer

BUILDERS: dict[str, Callable[[], Any]] = {
    "llama": tiny_llama_lm,
    "bart": tiny_bart,
    "t5": tiny_t5,
    "t5-gated": partial(tiny_t5, gated=True),
}
LENGTHS = [4, 11, 7, 16, 7, 2]  # unequal, with a tie, so sorting and padding both matter
BATCH = 4  # 6 prompts -> batches of 4 and 2


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and on a busy 2-core machine threads make them 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def prompts(tokenizer: Any) -> list[list[int]]:
    sentences = corpus_sentences(40)[-len(LENGTHS) :]
    return [tokenizer(text)["input_ids"][:length] for text, length in zip(sentences, LENGTHS)]


@pytest.fixture(scope="module", params=list(BUILDERS))
def model(request: pytest.FixtureRequest) -> Any:
    return BUILDERS[request.param]()


def one_by_one(model: Any, tokenizer: Any, prompts: list[list[int]], settings: GenerationSettings) -> list[list[int]]:
    """Each prompt in its own call: no padding, no sorting."""
    return [generate(model, tokenizer, [prompt], settings, batch_size=1, device="cpu")[0] for prompt in prompts]


def reference(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy decoding of one unpadded prompt, new tokens only, nothing cut."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, 1:].tolist() if model.config.is_encoder_decoder else out[0, len(prompt) :].tolist()


@pytest.mark.parametrize(
    "settings",
    [
        GenerationSettings(max_new_tokens=8),
        GenerationSettings(max_new_tokens=8, num_beams=3),
        GenerationSettings(max_new_tokens=8, num_beams=3, length_penalty=0.6, no_repeat_ngram_size=2),
    ],
    ids=["greedy", "beam3", "beam3-penalties"],
)
def test_batched_equals_one_by_one(model: Any, tokenizer: Any, prompts: list[list[int]], settings: Any) -> None:
    batched = generate(model, tokenizer, prompts, settings, batch_size=BATCH, device=torch.device("cpu"))
    assert batched == one_by_one(model, tokenizer, prompts, settings)
    special = {tokenizer.pad_token_id, tokenizer.eos_token_id}
    assert all(0 < len(row) <= settings.max_new_tokens and not special & set(row) for row in batched)


def test_greedy_is_transformers_greedy_without_prompt(model: Any, tokenizer: Any, prompts: list[list[int]]) -> None:
    """Output = what model.generate makes for the prompt alone, minus the prompt (or the decoder start token)."""
    ours = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=6), batch_size=BATCH, device="cpu")
    # No random tiny model here emits eos within 6 tokens, so nothing is cut.
    assert ours == [reference(model, prompt, 6) for prompt in prompts]


def test_max_new_tokens_is_a_prefix(model: Any, tokenizer: Any, prompts: list[list[int]]) -> None:
    short = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=3), batch_size=BATCH, device="cpu")
    long = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=8), batch_size=BATCH, device="cpu")
    assert short == [row[:3] for row in long]
    assert all(len(row) == 3 for row in short)


def test_order_is_input_order(model: Any, tokenizer: Any, prompts: list[list[int]]) -> None:
    settings = GenerationSettings(max_new_tokens=4)
    forward = generate(model, tokenizer, prompts, settings, batch_size=BATCH, device="cpu")
    backward = generate(model, tokenizer, prompts[::-1], settings, batch_size=BATCH, device="cpu")
    assert backward == forward[::-1]
    assert len(set(map(tuple, forward))) > 1  # distinct outputs, so a shuffle would show


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_eos_cuts_and_rows_finish_apart(name: str, tokenizer: Any, prompts: list[list[int]]) -> None:
    """A token the model emits mid-answer is declared an extra eos: every row stops at its first occurrence.

    The rows of a batch then finish at different steps, and the finished ones are padded by transformers
    while the others go on; batched output must still equal one-by-one output, and the greedy output must be
    the uncut output cut before that token.
    """
    model = BUILDERS[name]()
    greedy = GenerationSettings(max_new_tokens=8)
    uncut = generate(model, tokenizer, prompts, greedy, batch_size=BATCH, device="cpu")
    stop = next(row[3] for row in uncut if row[3] not in row[:3])
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]

    cut = generate(model, tokenizer, prompts, greedy, batch_size=BATCH, device="cpu")
    assert cut == [row[: row.index(stop)] if stop in row else row for row in uncut]
    assert any(len(row) == 8 for row in cut) and any(len(row) <= 3 for row in cut)
    assert cut == one_by_one(model, tokenizer, prompts, greedy)

    beams = GenerationSettings(max_new_tokens=8, num_beams=3)
    batched = generate(model, tokenizer, prompts, beams, batch_size=BATCH, device="cpu")
    assert batched == one_by_one(model, tokenizer, prompts, beams)
    assert not any(stop in row for row in batched)


class Recorder:
    """Wraps model.generate to see what it is called with and in which state."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.inner = model.generate
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> Any:
        state = {"training": self.model.training, "grad": torch.is_grad_enabled()}
        self.calls.append({**kwargs, **state, "own_config": self.model.generation_config})
        return self.inner(**kwargs)


def test_decoder_only_pads_left_with_mask(tokenizer: Any, prompts: list[list[int]]) -> None:
    model = tiny_llama_lm()
    recorder = Recorder(model)
    model.generate = recorder  # type: ignore[method-assign]
    generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=2), batch_size=BATCH, device="cpu")
    first = recorder.calls[0]
    ids, mask = first["input_ids"], first["attention_mask"]
    lengths = sorted(LENGTHS, reverse=True)[:BATCH]  # longest first
    assert ids.shape == (BATCH, lengths[0])
    for row, length in enumerate(lengths):
        assert mask[row].tolist() == [0] * (lengths[0] - length) + [1] * length
        assert ids[row, : lengths[0] - length].eq(tokenizer.pad_token_id).all()
    assert [call["input_ids"].shape[0] for call in recorder.calls] == [4, 2]


def test_encoder_decoder_pads_right(tokenizer: Any, prompts: list[list[int]]) -> None:
    model = tiny_bart()
    recorder = Recorder(model)
    model.generate = recorder  # type: ignore[method-assign]
    generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=2), batch_size=BATCH, device="cpu")
    mask = recorder.calls[0]["attention_mask"]
    lengths = sorted(LENGTHS, reverse=True)[:BATCH]
    for row, length in enumerate(lengths):
        assert mask[row].tolist() == [1] * length + [0] * (lengths[0] - length)


def test_eval_no_grad_during_and_state_restored_after(tokenizer: Any, prompts: list[list[int]]) -> None:
    model = tiny_llama_lm().train()
    own = model.generation_config
    recorder = Recorder(model)
    model.generate = recorder  # type: ignore[method-assign]
    done: list[int] = []
    generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=2), BATCH, "cpu", on_batch=done.append)
    assert done == [4, 2]
    assert all(not call["training"] and not call["grad"] for call in recorder.calls)
    assert recorder.calls[0]["own_config"] is not own  # ours was in place during the call
    assert model.training and model.generation_config is own and torch.is_grad_enabled()


def test_checkpoint_generation_defaults_do_not_leak_and_nothing_is_printed(
    tokenizer: Any, prompts: list[list[int]]
) -> None:
    """A generation_config.json with sampling, beams, lengths and penalties changes neither output nor logs."""
    model = tiny_llama_lm()
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    hf_logging.warning_once.cache_clear()  # warnings shown earlier in the session must show again here
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            settings = [GenerationSettings(max_new_tokens=5), GenerationSettings(max_new_tokens=5, num_beams=3)]
            clean = [generate(model, tokenizer, prompts, s, BATCH, "cpu") for s in settings]
            dirty_model = copy.deepcopy(model)
            dirty_model.generation_config = GenerationConfig(
                do_sample=True,
                temperature=0.6,
                top_p=0.9,
                top_k=5,
                max_length=50,
                min_length=12,
                num_beams=4,
                length_penalty=2.0,
                early_stopping=True,
                no_repeat_ngram_size=1,
                repetition_penalty=1.3,
            )
            dirty = [generate(dirty_model, tokenizer, prompts, s, BATCH, "cpu") for s in settings]
    finally:
        logger.removeHandler(handler)
    assert dirty == clean
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in records] == []


def test_special_tokens_fall_back_and_merge(tokenizer: Any) -> None:
    model = tiny_llama_lm()
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, 7]
    tokens = special_tokens(model, tokenizer)
    assert tokens.eos == (tokenizer.eos_token_id, 7) and tokens.pad == tokenizer.pad_token_id
    bare = tiny_tokenizer()  # a fresh wrapper: changing it leaves the shared fixture alone
    bare.pad_token = None
    model.generation_config.pad_token_id = None
    model.config.pad_token_id = None
    assert special_tokens(model, bare).pad == tokenizer.eos_token_id  # eos pads when nothing else does
    assert special_tokens(tiny_t5(), tokenizer).decoder_start == tokenizer.pad_token_id
    assert special_tokens(tiny_bart(), tokenizer).decoder_start == tokenizer.eos_token_id


def test_pad_is_never_generated(tokenizer: Any, prompts: list[list[int]]) -> None:
    """Even a model that favours the pad token never returns it: pad is not text."""
    model = tiny_llama_lm()
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        model.lm_head.weight[pad] *= 3  # pad now wins about half the steps
    uncut = [reference(model, prompt, 8) for prompt in prompts]
    assert sum(row.count(pad) for row in uncut) > 3
    settings = GenerationSettings(max_new_tokens=8, no_repeat_ngram_size=2)
    batched = generate(model, tokenizer, prompts, settings, BATCH, "cpu")
    assert not any(pad in row for row in batched) and all(len(row) == 8 for row in batched)
    assert batched == one_by_one(model, tokenizer, prompts, settings)


def test_generating_with_pad_as_eos_works(tokenizer: Any, prompts: list[list[int]]) -> None:
    """LLaMA-3 style: no pad token, so eos pads; padded batches still equal one-by-one."""
    model = tiny_llama_lm()
    bare = tiny_tokenizer()  # a fresh wrapper: changing it leaves the shared fixture alone
    bare.pad_token = None
    model.generation_config.pad_token_id = None
    model.config.pad_token_id = None
    settings = GenerationSettings(max_new_tokens=5)
    assert generate(model, bare, prompts, settings, BATCH, "cpu") == one_by_one(model, bare, prompts, settings)


def test_user_errors(tokenizer: Any) -> None:
    model = tiny_llama_lm()
    settings = GenerationSettings(max_new_tokens=2)
    assert generate(model, tokenizer, [], settings, BATCH, "cpu") == []
    with pytest.raises(AfloraError, match="prompt 1 is empty"):
        generate(model, tokenizer, [[0, 5], []], settings, BATCH, "cpu")
    with pytest.raises(AfloraError, match="batch size"):
        generate(model, tokenizer, [[0, 5]], settings, 0, "cpu")
    for bad in ({"max_new_tokens": 0}, {"num_beams": 0}, {"no_repeat_ngram_size": -1}):
        with pytest.raises(AfloraError):
            GenerationSettings(**bad)
