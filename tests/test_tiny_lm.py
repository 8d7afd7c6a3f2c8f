"""The offline generation fixtures: a deterministic tokenizer with a chat template, and model directories that
transformers' Auto classes load back to the same logits."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from tiny_lm import (
    CHAT_TEMPLATE,
    KV_HEADS,
    VOCAB,
    _trained_backend,
    save_model_dir,
    tiny_bart,
    tiny_llama_lm,
    tiny_t5,
    tiny_tokenizer,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tokenizer_specials_and_round_trip() -> None:
    tokenizer = tiny_tokenizer()
    assert len(tokenizer) == VOCAB
    assert [tokenizer.bos_token, tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token] == [
        "<s>",
        "<pad>",
        "</s>",
        "<unk>",
    ]
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    text = "An utterly charming movie, with 2 leads — and a café!"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids  # bos added, eos not (LLaMA-like)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text  # byte-level: nothing is unknown
    assert len(ids) < 0.7 * len(text.encode())  # merges were learnt: fewer tokens than bytes


def test_tokenizer_training_is_deterministic() -> None:
    assert _trained_backend.__wrapped__().to_str() == _trained_backend().to_str()


def test_chat_template() -> None:
    tokenizer = tiny_tokenizer()
    assert tokenizer.chat_template == CHAT_TEMPLATE
    chat = [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 2 + 4?"},
    ]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<s><|user|>\nWhat is 2 + 3?\n<|assistant|>\n5</s>\n<|user|>\nAnd 2 + 4?\n<|assistant|>\n"
    assert tokenizer.apply_chat_template(chat, tokenize=False).endswith("And 2 + 4?\n")
    # The rendered text carries its own bos: tokenized without added specials, bos and eos appear once each.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids.count(tokenizer.eos_token_id) == 1


def test_models_use_the_tokenizer_ids() -> None:
    tokenizer = tiny_tokenizer()
    llama = tiny_llama_lm()
    assert llama.config.num_key_value_heads == KV_HEADS < llama.config.num_attention_heads
    assert (llama.config.bos_token_id, llama.config.eos_token_id, llama.config.pad_token_id) == (0, 2, 1)
    bart = tiny_bart()
    assert bart.config.decoder_start_token_id == tokenizer.eos_token_id
    t5 = tiny_t5(gated=True)
    assert t5.config.decoder_start_token_id == tokenizer.pad_token_id
    assert hasattr(t5.encoder.block[0].layer[1].DenseReluDense, "wi_0")
    assert not hasattr(tiny_t5().encoder.block[0].layer[1].DenseReluDense, "wi_0")
    for model in (llama, bart, t5):
        assert model.get_output_embeddings().weight.shape[0] == VOCAB
    assert torch.equal(tiny_llama_lm().lm_head.weight, llama.lm_head.weight)  # seeded


CASES: dict[str, tuple[Callable[[], Any], Any]] = {
    "llama": (tiny_llama_lm, AutoModelForCausalLM),
    "bart": (tiny_bart, AutoModelForSeq2SeqLM),
    "t5-gated": (partial(tiny_t5, gated=True), AutoModelForSeq2SeqLM),
}


@pytest.mark.parametrize("name", list(CASES))
def test_saved_directory_loads_offline_to_the_same_model(name: str, tmp_path: Path) -> None:
    build, auto = CASES[name]
    model, tokenizer = build(), tiny_tokenizer()
    path = save_model_dir(model, tokenizer, tmp_path / name)
    for file in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (path / file).is_file(), file

    loaded_tokenizer = AutoTokenizer.from_pretrained(path)
    text = "a sharp, funny film"
    assert loaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded_tokenizer.chat_template == CHAT_TEMPLATE
    assert loaded_tokenizer.pad_token_id == tokenizer.pad_token_id

    loaded = auto.from_pretrained(path).eval()
    assert type(loaded) is type(model)
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    inputs: dict[str, torch.Tensor] = {"input_ids": ids}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.tensor([[model.config.decoder_start_token_id, 40, 41]])
        assert loaded.generation_config.decoder_start_token_id == model.config.decoder_start_token_id
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
