"""Offline fixtures for generation tests: a tiny trained BPE tokenizer and tiny random generative models.

Nothing here touches a model hub. The tokenizer is trained on the fly from the movie-review sentences the
package ships, so its vocabulary is real English sub-words and decoded text is readable in test failures.
The models are randomly initialised with a wider weight init than the usual 0.02: at 0.02 the LLaMA's logits
are within a few thousandths of each other and BART and T5 repeat one token forever, so decoding would hinge
on float rounding and test little. With the chosen scales the output varies, and the smallest top-two logit
gap measured over about 100 greedy steps per model was 0.005, far above the float noise that padding adds
(about 1e-6); so tests can demand exact token equality between batched and one-by-one generation.
"""

from __future__ import annotations

import csv
import functools
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "aflora_cli" / "datasets" / "movie_reviews" / "train.tsv"
CORPUS_ROWS = 2000
VOCAB = 400  # 256 byte symbols + 4 specials + 140 merges
# BART/RoBERTa's order, so the ids match BartConfig's defaults (bos 0, pad 1, eos 2, unk 3).
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]

HIDDEN = 48
LAYERS = 2
HEADS = 4
KV_HEADS = 2  # grouped-query attention: 2 key/value heads shared by 4 query heads
INTERMEDIATE = 96
MAX_POSITIONS = 256
# Init scales (see the module docstring), picked by measuring output variety and top-two logit gaps.
LLAMA_INIT_STD = 0.5
BART_INIT_STD = 1.0
T5_INIT_FACTOR = 4.0  # T5 scales its init by d_model ** -0.5 itself; this multiplies that
# A learning test needs the opposite: at the wide scales the random logits are huge (a loss of 20-50 nats on a
# 400-token vocabulary), so whether a few steps lower it turns on the machine's float rounding. `wide=False`
# builds the model at a sane scale (loss near ln 400 = 6), where fitting a few rows is a clear fall: T5 at
# its own init; BART at 0.1 (at its own 0.02 the adapters barely move its tiny logits in 40 steps).
BART_SANE_STD = 0.1
T5_SANE_FACTOR = 1.0

# LLaMA-style chat markup. The template emits bos itself, as real LLaMA templates do, so a rendered
# conversation is tokenized with add_special_tokens=False. Every assistant turn ends with eos: that is the
# token a chat model learns to stop on. (The newline after an `endif` is printed as an expression because
# transformers renders chat templates with trim_blocks, which drops a literal newline after a block tag.)
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def corpus_sentences(rows: int = CORPUS_ROWS) -> list[str]:
    """The first `rows` review sentences (first column of the shipped train.tsv)."""
    sentences = []
    with CORPUS.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        for row in reader:
            sentences.append(row[0])
            if len(sentences) == rows:
                break
    return sentences


@functools.cache
def _trained_backend() -> Tokenizer:
    """Train once per process (about a second): byte-level BPE, so no text is ever out of vocabulary."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_sentences(), trainer)
    bos_id = tokenizer.token_to_id("<s>")
    # LLaMA-like: encoding a text prepends bos and adds no eos.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", bos_id)]
    )
    return tokenizer


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh wrapper around the cached trained tokenizer: callers may change it (padding side) freely."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_trained_backend(), bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """bos, eos and pad ids; the models take them from the tokenizer so the two always agree."""
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    return {name: int(value) for name, value in ids.items() if value is not None}


def tiny_llama_lm(
    seed: int = 0,
    tokenizer: PreTrainedTokenizerFast | None = None,
    hidden: int = HIDDEN,
    intermediate: int = INTERMEDIATE,
) -> LlamaForCausalLM:
    """LLaMA causal LM with grouped-query attention (4 query heads, 2 key/value heads), untied head."""
    ids = _special_ids(tokenizer or tiny_tokenizer())
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        intermediate_size=intermediate,
        max_position_embeddings=MAX_POSITIONS,
        initializer_range=LLAMA_INIT_STD,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_bart(
    seed: int = 0, tokenizer: PreTrainedTokenizerFast | None = None, wide: bool = True
) -> BartForConditionalGeneration:
    """BART encoder-decoder; the decoder starts from eos, as BART's pretraining does. `wide`: the wide init,
    else a sane one."""
    ids = _special_ids(tokenizer or tiny_tokenizer())
    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=INTERMEDIATE,
        decoder_ffn_dim=INTERMEDIATE,
        max_position_embeddings=MAX_POSITIONS,
        init_std=BART_INIT_STD if wide else BART_SANE_STD,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        decoder_start_token_id=ids["eos"],
        forced_eos_token_id=None,
    )
    return BartForConditionalGeneration(config).eval()


def tiny_t5(
    seed: int = 0, tokenizer: PreTrainedTokenizerFast | None = None, gated: bool = False, wide: bool = True
) -> T5ForConditionalGeneration:
    """T5 encoder-decoder; the decoder starts from pad, as T5 does. `gated` gives the v1.1 `wi_0`/`wi_1` MLP;
    `wide`: the wide init, else a sane one."""
    ids = _special_ids(tokenizer or tiny_tokenizer())
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        d_kv=HIDDEN // HEADS,
        d_ff=INTERMEDIATE,
        num_layers=LAYERS,
        num_decoder_layers=LAYERS,
        num_heads=HEADS,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu" if gated else "relu",
        initializer_factor=T5_INIT_FACTOR if wide else T5_SANE_FACTOR,
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        decoder_start_token_id=ids["pad"],
    )
    return T5ForConditionalGeneration(config).eval()


def save_model_dir(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: str | Path) -> Path:
    """A local model directory (config, safetensors weights, generation config, tokenizer files) for offline loading."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
