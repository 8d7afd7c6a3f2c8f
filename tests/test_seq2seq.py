"""The seq2seq family: targets, rows to tokens and labels, and whole runs on tiny BART and T5 (random weights)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from text_runs import lm_recipe, model_dir, review_files, review_rows, write_jsonl
from typer.testing import CliRunner

from aflora_cli.cli import app
from aflora_cli.engine.config import AdapterConfig
from aflora_cli.engine.inject import find_targets
from aflora_cli.engine.manifest import MANIFEST_FILE, WEIGHTS_FILE
from aflora_cli.recipe import parse_recipe
from aflora_cli.tasks import resolve_task
from aflora_cli.tasks.generative import IGNORE
from aflora_cli.tasks.seq2seq import Seq2SeqTask
from aflora_cli.tasks.text_data import TextRow
from aflora_cli.training.trainer import Trainer
from tiny_lm import LAYERS, tiny_bart, tiny_t5, tiny_tokenizer

runner = CliRunner()
KINDS = ["bart", "t5"]

# ------------------------------------------------------------------------------------------------ targets


def _per_layer(prefix: str, layers: int, suffixes: dict[str, str]) -> dict[str, str]:
    return {f"{prefix}.{i}.{suffix}": kind for i in range(layers) for suffix, kind in suffixes.items()}


def _bart_like(prefix: str, layers: int) -> dict[str, str]:
    attention = {
        f"{block}.{proj}": "attention"
        for block in ("self_attn",)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj")
    }
    cross = {f"encoder_attn.{proj}": "attention" for proj in ("q_proj", "k_proj", "v_proj", "out_proj")}
    ffn = {"fc1": "ffn", "fc2": "ffn"}
    return _per_layer(f"{prefix}.encoder.layers", layers, attention | ffn) | _per_layer(
        f"{prefix}.decoder.layers", layers, attention | cross | ffn
    )


def _t5_like(layers: int, gated: bool) -> dict[str, str]:
    def attention(module: str, layer: int) -> dict[str, str]:
        return {f"layer.{layer}.{module}.{p}": "attention" for p in "qkvo"}

    wi = ["wi_0", "wi_1"] if gated else ["wi"]
    ffn = lambda layer: {f"layer.{layer}.DenseReluDense.{w}": "ffn" for w in [*wi, "wo"]}  # noqa: E731
    encoder = _per_layer("encoder.block", layers, attention("SelfAttention", 0) | ffn(1))
    decoder = _per_layer(
        "decoder.block", layers, attention("SelfAttention", 0) | attention("EncDecAttention", 1) | ffn(2)
    )
    return encoder | decoder


def _tiny_from_config(model_type: str, **special: int) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    config = AutoConfig.for_model(
        model_type,
        vocab_size=100,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
        **special,
    )
    return AutoModelForSeq2SeqLM.from_config(config)


@pytest.mark.parametrize(
    "build, expected, count",
    [
        (tiny_bart, _bart_like("model", LAYERS), 2 * 6 + 2 * 10),
        (
            lambda: _tiny_from_config("mbart", pad_token_id=1, bos_token_id=0, eos_token_id=2),
            _bart_like("model", 1),
            16,
        ),
        (lambda: _tiny_from_config("pegasus", pad_token_id=0, eos_token_id=1), _bart_like("model", 1), 16),
        (tiny_t5, _t5_like(LAYERS, gated=False), 2 * 6 + 2 * 10),
        (lambda: tiny_t5(gated=True), _t5_like(LAYERS, gated=True), 2 * 7 + 2 * 11),
    ],
    ids=["bart", "mbart", "pegasus", "t5", "t5-gated"],
)
def test_default_targets_of_encoder_decoders(build: Any, expected: dict[str, str], count: int) -> None:
    model = build()
    targets = find_targets(model, AdapterConfig())
    assert {t.name: t.kind for t in targets} == expected
    assert len(targets) == count
    assert all(not t.name.endswith("lm_head") for t in targets)


# ---------------------------------------------------------------------------------------- rows to tokens


def task_of(kind: str = "bart", source: int = 16, target: int = 6, **data: Any) -> Seq2SeqTask:
    raw = lm_recipe(
        Path("/tmp/unused"),
        kind,
        {"train_file": Path("train.jsonl")},
        data=data,
        training={"max_source_length": source, "max_target_length": target},
    )
    from transformers import AutoConfig

    task = resolve_task(parse_recipe(raw, "test"), AutoConfig.from_pretrained(model_dir(kind)))
    assert isinstance(task, Seq2SeqTask)
    return task


def test_an_encoder_decoder_with_a_text_task_is_seq2seq() -> None:
    task = task_of("t5")
    assert task.family == "seq2seq" and task.describe()["family"] == "seq2seq"


def test_source_and_target_are_cut_to_their_limits_and_the_target_ends_with_eos() -> None:
    tokenizer = tiny_tokenizer()
    eos = tokenizer.eos_token_id
    task = task_of(source=16, target=8)
    short = TextRow("Review: a fine film", "positive", "positive")
    encoded = task.encode(short, tokenizer, "row 1")
    assert encoded is not None
    source = tokenizer(short.prompt)["input_ids"]
    assert encoded["input_ids"].tolist() == source == encoded["prompt_ids"].tolist()
    assert encoded["labels"].tolist() == [*tokenizer(text_target="positive")["input_ids"], eos]
    long = TextRow("word " * 40, "great " * 40, "")
    encoded = task.encode(long, tokenizer, "row 2")
    assert encoded is not None
    assert encoded["input_ids"].tolist() == tokenizer("word " * 40)["input_ids"][:16]
    assert encoded["labels"].tolist() == [*tokenizer(text_target="great " * 40)["input_ids"][:7], eos]


@pytest.mark.parametrize("kind", KINDS)
def test_collate_pads_labels_with_ignore_and_the_model_builds_its_decoder_inputs(kind: str) -> None:
    from torch.nn import functional as F

    tokenizer = tiny_tokenizer()
    task = task_of(kind, source=32, target=12)
    rows = [
        task.encode(TextRow("Review: dull and long", "negative", ""), tokenizer, "row 1"),
        task.encode(TextRow("Review: a warm, funny and clever film", "a very positive one", ""), tokenizer, "row 2"),
    ]
    batch = task.collate(tokenizer)([row for row in rows if row is not None])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    short = len(rows[0]["labels"])  # type: ignore[index]
    assert (batch["labels"][0, short:] == IGNORE).all() and (batch["labels"][0, :short] != IGNORE).all()
    assert (batch["input_ids"][0][batch["attention_mask"][0] == 0] == tokenizer.pad_token_id).all()
    model = (tiny_bart if kind == "bart" else tiny_t5)(tokenizer=tokenizer)
    with torch.no_grad():
        out = model(**batch)
    by_hand = F.cross_entropy(out.logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)
    assert torch.allclose(out.loss, by_hand, atol=1e-6)
    assert task.loss_tokens(batch) == int((batch["labels"] != IGNORE).sum())


# -------------------------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return review_files(tmp_path_factory.mktemp("reviews"), train=32, validation=8)


def _run(raw: dict[str, Any]) -> Path:
    trainer = Trainer(parse_recipe(raw, "test"))
    trainer.prepare()
    trainer.train()
    trainer.close()
    return Path(raw["output_dir"])


@pytest.fixture(scope="module", params=KINDS)
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, files: dict[str, Path]) -> Path:
    out = tmp_path_factory.mktemp(request.param) / "run"
    return _run(lm_recipe(out, request.param, files, training={"eval_on_start": True, "eval_every": 4}))


def _records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_seq2seq_run_has_no_head_and_reports_loss_perplexity_and_its_metric(trained: Path) -> None:
    manifest = json.loads((trained / "last" / MANIFEST_FILE).read_text())
    assert manifest["task"]["family"] == "seq2seq" and manifest["head"] == []
    tensors = load_file(str(trained / "last" / WEIGHTS_FILE))
    assert all(name.rsplit(".", 1)[1] in ("lora_A", "lora_B", "lambda_d", "lambda_b") for name in tensors)
    assert len(tensors) == 4 * 32  # 32 adapted layers in both tiny models (see the targets test)
    evals = [r for r in _records(trained) if "eval" in r]
    assert [r["step"] for r in evals] == [0, 4, 8]
    for record in evals:
        metrics = record["eval"]["validation"]
        assert set(metrics) == {"loss", "perplexity", "exact_match"}
        assert metrics["perplexity"] == pytest.approx(torch.tensor(metrics["loss"]).exp().item(), rel=1e-6)
    # no learning claim here: these wide-init models' losses move by float rounding over 8 steps; learning is
    # asserted with a margin on models at a sane scale in test_a_tiny_encoder_decoder_learns_a_small_set


def test_eval_equals_what_training_logged_and_writes_predictions(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "predictions.jsonl"
    result = runner.invoke(app, ["eval", str(trained / "last"), "--json", "--predictions", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    logged = json.loads((trained / "last" / MANIFEST_FILE).read_text())["metrics"]["validation"]
    assert report["metrics"] == pytest.approx(logged, rel=1e-5)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == report["rows"] == 8
    assert rows[0]["prompt"].startswith("Review: ") and rows[0]["reference"] in ("negative", "positive")
    assert sum(row["correct"] for row in rows) / len(rows) == pytest.approx(report["metrics"]["exact_match"])


def test_predictions_hold_the_source_the_model_saw_and_the_whole_input(trained: Path, tmp_path: Path) -> None:
    """A source longer than max_source_length: `prompt` is what the encoder got (decoded after truncation),
    `source` the whole input."""
    from transformers import AutoTokenizer

    long_source = "Review: " + " ".join(f"scene {i} was long" for i in range(120))
    file = write_jsonl(tmp_path / "long.jsonl", [{"prompt": long_source, "response": "negative"}])
    out = tmp_path / "predictions.jsonl"
    result = runner.invoke(app, ["eval", str(trained / "last"), "--data", str(file), "--predictions", str(out)])
    assert result.exit_code == 0, result.output
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(
        json.loads((trained / "last" / MANIFEST_FILE).read_text())["base_model"]["name_or_path"]
    )
    seen = tokenizer(long_source, truncation=True, max_length=128)["input_ids"]
    assert len(tokenizer(long_source)["input_ids"]) > 128 == len(seen)
    assert row["prompt"] == tokenizer.decode(seen, skip_special_tokens=True)
    assert len(row["prompt"]) < len(long_source) and long_source.startswith(row["prompt"].strip())
    assert list(row)[:2] == ["prompt", "source"] and row["source"] == long_source


@pytest.mark.parametrize("kind", KINDS)
def test_resume_of_a_seq2seq_run_is_bit_exact(kind: str, tmp_path: Path, files: dict[str, Path]) -> None:
    settings: dict[str, Any] = {"training": {"max_steps": 6, "save_every": 3, "eval_every": 3}}
    straight = lm_recipe(tmp_path / "straight", kind, files, **settings)
    interrupted = lm_recipe(tmp_path / "interrupted", kind, files, **settings)

    class Crash(Exception):
        pass

    def crash_at_step_5(kind: str, record: dict) -> None:
        if kind == "step" and record["step"] == 5:
            raise Crash

    _run(copy.deepcopy(straight))
    trainer = Trainer(parse_recipe(copy.deepcopy(interrupted), "test"), on_event=crash_at_step_5)
    trainer.prepare()
    with pytest.raises(Crash):
        trainer.train()
    trainer.close()
    assert json.loads((tmp_path / "interrupted" / "last" / MANIFEST_FILE).read_text())["step"] == 3
    trainer = Trainer(parse_recipe(copy.deepcopy(interrupted), "test"), resume=True)
    trainer.prepare()
    trainer.train()
    trainer.close()
    expected = load_file(str(tmp_path / "straight" / "last" / WEIGHTS_FILE))
    got = load_file(str(tmp_path / "interrupted" / "last" / WEIGHTS_FILE))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert _records(tmp_path / "straight") == _records(tmp_path / "interrupted")


# ------------------------------------------------------------------------------------------ merge, export


def _base_dir(run: Path) -> str:
    return str(json.loads((run / "last" / MANIFEST_FILE).read_text())["base_model"]["name_or_path"])


def _validation(run: Path) -> tuple[Any, Any, list[list[int]], dict[str, torch.Tensor]]:
    from aflora_cli.adapted.loading import load_checkpoint

    loaded = load_checkpoint(run / "last")

    adapted, task = loaded.adapted, loaded.task
    rows = task.load_splits(adapted.tokenizer, ["validation"]).evaluation["validation"]
    batch = task.collate(adapted.tokenizer)(list(rows))
    return adapted, task, [list(row["prompt_ids"]) for row in rows], batch


def test_merged_seq2seq_model_loads_without_aflora_generates_the_same_and_keeps_tied_weights(
    trained: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from aflora_cli.tasks.generation import generate

    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(trained / "last"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "AutoModelForSeq2SeqLM.from_pretrained" in result.stdout
    merged = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    base = AutoModelForSeq2SeqLM.from_pretrained(_base_dir(trained)).eval()
    adapted, task, prompts, batch = _validation(trained)
    model = adapted.model.eval()
    with torch.no_grad():
        expected, got, before = (m(**batch).logits for m in (model, merged, base))
    assert (expected - before).abs().max() > 1e-3  # the adapters changed the model
    assert (expected - got).abs().max() < 1e-4
    settings, cpu = task.settings(6), torch.device("cpu")
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert generate(merged, tokenizer, prompts, settings, 4, cpu) == generate(
        model, adapted.tokenizer, prompts, settings, 4, cpu
    )
    # the shared / tied embeddings are untouched by the merge and still shared after loading
    embeddings = merged.get_input_embeddings().weight
    assert torch.equal(embeddings, base.get_input_embeddings().weight)
    assert merged.get_output_embeddings().weight.data_ptr() == embeddings.data_ptr()
    if merged.config.model_type == "bart":
        shared = merged.model.shared.weight
        for stack in (merged.model.encoder, merged.model.decoder):
            assert stack.embed_tokens.weight.data_ptr() == shared.data_ptr()


def test_peft_export_of_a_seq2seq_checkpoint_gives_the_same_logits(trained: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    out = tmp_path / "peft"
    result = runner.invoke(app, ["merge", str(trained / "last"), "--out", str(out), "--format", "peft"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM" and config["modules_to_save"] is None
    assert config["fan_in_fan_out"] is False
    peft_model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(_base_dir(trained)), out).eval()
    adapted, _, _, batch = _validation(trained)
    # in float64, as for the causal family: float32 rounding in the tiny model's wide activations would blur
    # the comparison. What is left is the rounding of the exported float32 products Λd·A and Λb·B (relative
    # ~1e-7), carried through both stacks and cross-attention to logits as large as 40 (random init at 1.0
    # / 4x T5's), so the bound is relative to the logits' size: measured 3e-6 of it for BART, 1e-6 for T5
    with torch.no_grad():
        ours = adapted.model.double().eval()(**batch).logits
        theirs = peft_model.double()(**batch).logits
        assert (ours - theirs).abs().max() < 1e-5 * ours.abs().max()


# ------------------------------------------------------------------------------------------------- ROUGE


def test_a_rouge_run_reports_rouge_and_scores_rows_like_rouge_score(tmp_path: Path, files: dict[str, Path]) -> None:
    from rouge_score import rouge_scorer

    from aflora_cli.tasks.text_metrics import METRICS, split_sentences

    # the target repeats the review's opening words, so generations share words with references
    rows = [json.loads(line) for line in files["train_file"].read_text().splitlines()]
    summaries = [{"prompt": r["prompt"], "response": " ".join(r["prompt"].split()[1:5])} for r in rows]
    train = write_jsonl(tmp_path / "train.jsonl", summaries[:24])
    validation = write_jsonl(tmp_path / "validation.jsonl", summaries[24:])
    raw = lm_recipe(
        tmp_path / "run",
        "bart",
        {"train_file": train, "validation_file": validation},
        data={"metric": "rouge"},
        training={"max_steps": 4},
        eval={"max_new_tokens": 8},
    )
    run = _run(raw)
    logged = json.loads((run / "last" / MANIFEST_FILE).read_text())["metrics"]["validation"]
    assert set(logged) == {"loss", "perplexity", "rouge1", "rouge2", "rougeL", "rougeLsum"}
    out = tmp_path / "predictions.jsonl"
    result = runner.invoke(app, ["eval", str(run / "last"), "--json", "--predictions", str(out)])
    assert result.exit_code == 0, result.output
    predicted = [json.loads(line) for line in out.read_text().splitlines()]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    for row in predicted:
        reference, output = row["reference"], row["output"]
        expected = scorer.score(reference, output)
        lsum = scorer.score(split_sentences(reference), split_sentences(output))["rougeLsum"]
        for name in ("rouge1", "rouge2", "rougeL"):
            assert row["scores"][name] == pytest.approx(expected[name].fmeasure)
        assert row["scores"]["rougeLsum"] == pytest.approx(lsum.fmeasure)
    for name in ("rouge1", "rougeL"):
        mean = sum(row["scores"][name] for row in predicted) / len(predicted)
        assert json.loads(result.stdout)["metrics"][name] == pytest.approx(mean)
    # a few training steps leave the random model far from copying, so its rows mostly score 0: the same
    # scoring is checked on hand-written pairs that overlap partly, with several sentences for rougeLsum
    pairs = [
        ("The film is warm. It is funny and clever.", "A warm film. Funny, and clever too."),
        ("Cantet perfectly captures the mood.", "Cantet captures the moods perfectly"),
        ("Light, cute and forgettable.", "forgettable"),
    ]
    metric = METRICS["rouge"]
    for (reference, output), row in zip(pairs, metric.score([o for _, o in pairs], [r for r, _ in pairs]), strict=True):
        expected = scorer.score(reference, output)
        lsum = scorer.score(split_sentences(reference), split_sentences(output))["rougeLsum"]
        assert row.scores["rouge1"] == pytest.approx(expected["rouge1"].fmeasure) and row.scores["rouge1"] > 0
        assert row.scores["rouge2"] == pytest.approx(expected["rouge2"].fmeasure)
        assert row.scores["rougeL"] == pytest.approx(expected["rougeL"].fmeasure)
        assert row.scores["rougeLsum"] == pytest.approx(lsum.fmeasure)


# --------------------------------------------------------------------------------------------- bad input


def _train(tmp_path: Path, raw: dict[str, Any]) -> Any:
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(raw), encoding="utf-8")
    return runner.invoke(app, ["train", str(path)])


@pytest.mark.parametrize(
    "rows, data, training, parts",
    [
        ([{"response": "positive"}], {}, {}, ("missing column 'prompt'",)),
        ([{"prompt": "Review: fine"}], {}, {}, ("missing column 'response'",)),
        ([{"prompt": "Review: fine", "response": " "}], {}, {}, ("row 1", "empty response")),
        (
            [{"prompt": "Review: fine", "response": "positive"}, {"prompt": "word " * 40, "response": "negative"}],
            {"truncation": False},
            {"max_source_length": 16},
            ("row 2", "more than 16", "training.max_source_length"),
        ),
        (
            [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}],
            {"format": "chat"},
            {},
            ("data.format: chat", "encoder-decoder"),
        ),
    ],
    ids=["no_source", "no_target", "empty_target", "long_source", "chat"],
)
def test_bad_seq2seq_input_is_one_line_and_writes_nothing(
    tmp_path: Path, rows: list[dict[str, Any]], data: dict[str, Any], training: dict[str, Any], parts: tuple[str, ...]
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    raw = lm_recipe(tmp_path / "run", "bart", {"train_file": train}, data=data, training=training)
    result = _train(tmp_path, raw)
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message, message
    for part in parts:
        assert part in message, message
    assert not (tmp_path / "run").exists()


def test_generate_completes_a_prompt_with_a_seq2seq_checkpoint(trained: Path) -> None:
    from typer.testing import CliRunner

    from aflora_cli.adapted.loading import load_checkpoint
    from aflora_cli.cli import app
    from aflora_cli.tasks.generation import generate

    prompt = "Review: a warm and funny film\nSentiment:"
    result = CliRunner().invoke(app, ["generate", str(trained / "last"), "--prompt", prompt, "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    loaded = load_checkpoint(trained / "last")
    adapted, task = loaded.adapted, loaded.task
    source = list(adapted.tokenizer(prompt)["input_ids"])
    expected = generate(adapted.model, adapted.tokenizer, [source], task.settings(4), 1, torch.device("cpu"))[0]
    assert result.stdout.strip() == adapted.tokenizer.decode(expected, skip_special_tokens=True).strip()


@pytest.mark.parametrize("kind", KINDS)
def test_a_tiny_encoder_decoder_learns_a_small_set(kind: str, tmp_path: Path) -> None:
    """Random tiny weights at a sane init scale (loss near ln 400) fit 16 rows they are shown 40 times: the
    fall is far beyond float rounding on any machine (measured here: to 0.30 and 0.11 of the start)."""
    rows = write_jsonl(tmp_path / "rows.jsonl", review_rows("train", 16))
    raw = lm_recipe(
        tmp_path / "run",
        f"{kind}-sane-init",
        {"train_file": rows, "validation_file": rows},
        adapter={"method": "aflora", "rank": 4, "policy": {"attention": "trainable", "ffn": "trainable"}},
        training={"max_steps": 40, "lr": 3e-2, "eval_on_start": True, "eval_every": 40},
        eval={"max_new_tokens": 2},
    )
    run = _run(raw)
    evals = [r["eval"]["validation"]["loss"] for r in _records(run) if "eval" in r]
    assert evals[-1] < 0.5 * evals[0], evals
