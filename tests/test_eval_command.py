"""`aflora eval CKPT`: the figure training logged, from the checkpoint directory alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from aflora_cli.adapted.loading import load_checkpoint
from aflora_cli.cli import app
from aflora_cli.engine.base_model import resolve_model_dir
from aflora_cli.engine.manifest import MANIFEST_FILE
from aflora_cli.tasks.classification import predict
from aflora_cli.tasks.tables import SHIPPED_DIR, read_table
from trained_checkpoints import (
    BAD_CHECKPOINTS,
    aflora_run,
    assert_user_error,
    bad_checkpoint,
    copy_checkpoint,
    manifest_of,
    moved_base,
)

runner = CliRunner()
MINILM_DIR = resolve_model_dir("sentence-transformers/all-MiniLM-L6-v2")


def eval_json(*args: str) -> dict:
    result = runner.invoke(app, ["eval", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("which", ["best", "last"])
def test_eval_equals_what_training_logged(which: str) -> None:
    checkpoint = aflora_run() / which
    manifest = manifest_of(checkpoint)
    out = eval_json(str(checkpoint))  # default split: the task's first eval split
    assert out["split"] == "validation" and out["rows"] == 64 and out["step"] == manifest["step"]
    logged = manifest["metrics"]["validation"]
    assert out["logged"] == logged
    assert set(out["metrics"]) == set(logged) == {"accuracy"}
    for name, value in logged.items():
        assert abs(out["metrics"][name] - value) <= 1e-9
    # and the trainer's own log (metrics.jsonl) has the same figure at that step
    records = [json.loads(line) for line in (aflora_run() / "metrics.jsonl").read_text().splitlines()]
    at_step = [r for r in records if r.get("step") == manifest["step"] and "eval" in r]
    assert at_step and abs(at_step[-1]["eval"]["validation"]["accuracy"] - out["metrics"]["accuracy"]) <= 1e-9


def test_eval_other_split_prints_a_table() -> None:
    checkpoint = aflora_run() / "last"
    logged = manifest_of(checkpoint)["metrics"]["test"]["accuracy"]
    result = runner.invoke(app, ["eval", str(checkpoint), "--split", "test"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "split test (64 rows)" in result.stdout
    row = next(line for line in result.stdout.splitlines() if "accuracy" in line)
    assert row.count(f"{logged:.4f}") == 2  # our value and the logged one, side by side
    assert "logged in training (step 8)" in result.stdout


def test_eval_local_file_scores_its_rows(tmp_path: Path) -> None:
    """--data: a jsonl file with the task's columns (labels by name), scored against an independent count."""
    checkpoint = aflora_run() / "best"
    table = read_table(SHIPPED_DIR / "movie_reviews" / "validation.tsv")
    rows = [
        {"sentence": s, "label": ["negative", "positive"][int(l)]}
        for s, l in zip(table["sentence"][:24], table["label"][:24], strict=True)
    ]
    file = tmp_path / "mine.jsonl"
    file.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")

    out = eval_json(str(checkpoint), "--data", str(file))
    assert out["data_file"] == str(file) and out["split"] is None and out["rows"] == 24 and out["logged"] is None

    adapted = load_checkpoint(checkpoint).adapted
    labels = torch.tensor([["negative", "positive"].index(row["label"]) for row in rows])
    with torch.no_grad():
        batch = adapted.tokenizer(
            [row["sentence"] for row in rows], truncation=True, max_length=32, padding=True, return_tensors="pt"
        )
        predicted = adapted.model.eval()(**batch).logits.argmax(-1)
    assert abs(out["metrics"]["accuracy"] - (predicted == labels).float().mean().item()) <= 1e-6


def test_eval_with_a_moved_base_model(tmp_path: Path) -> None:
    best = aflora_run() / "best"
    gone = "/nonexistent/models/minilm"
    checkpoint = copy_checkpoint(best, tmp_path / "ckpt", base_model__name_or_path=gone)
    manifest = manifest_of(checkpoint)
    manifest["recipe"]["model"]["name_or_path"] = gone
    (checkpoint / MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")

    result = runner.invoke(app, ["eval", str(checkpoint)])
    assert_user_error(result, gone, "--base")

    moved = moved_base(tmp_path / "moved", MINILM_DIR)
    out = eval_json(str(checkpoint), "--base", str(moved))
    assert abs(out["metrics"]["accuracy"] - manifest["metrics"]["validation"]["accuracy"]) <= 1e-9


def test_eval_refuses_a_base_model_with_another_fingerprint(tmp_path: Path) -> None:
    other = moved_base(tmp_path / "other", MINILM_DIR, config_change={"layer_norm_eps": 1e-5})
    result = runner.invoke(app, ["eval", str(aflora_run() / "best"), "--base", str(other)])
    assert_user_error(result, str(aflora_run() / "best"), "fingerprint", str(other))


def test_eval_bad_options() -> None:
    checkpoint = str(aflora_run() / "best")
    assert_user_error(runner.invoke(app, ["eval", checkpoint, "--split", "nope"]), "nope", "validation")
    assert_user_error(runner.invoke(app, ["eval", checkpoint, "--split", "test", "--data", "x.tsv"]), "--data")
    assert_user_error(runner.invoke(app, ["eval", checkpoint, "--data", "/nonexistent/x.tsv"]), "/nonexistent/x.tsv")
    assert_user_error(runner.invoke(app, ["eval", checkpoint, "--base", "/nonexistent/base"]), "/nonexistent/base")


@pytest.mark.parametrize("kind", BAD_CHECKPOINTS)
def test_eval_bad_checkpoint_is_one_clear_line(kind: str, tmp_path: Path) -> None:
    checkpoint = bad_checkpoint(kind, aflora_run() / "best", tmp_path)
    assert_user_error(runner.invoke(app, ["eval", str(checkpoint)]), str(checkpoint))


def test_sort_by_length_scores_every_row_in_split_order_with_less_padding() -> None:
    """eval.sort_by_length: longest-first batches pad fewer positions, and every row keeps its own logits
    (equal up to float rounding) at its own place; off, the batches are the split's order."""
    loaded = load_checkpoint(aflora_run() / "last")
    adapted, task = loaded.adapted, loaded.task
    rows = task.load_splits(adapted.tokenizer, ["validation"]).evaluation["validation"]
    lengths = task.lengths(rows)
    positions: list[int] = []
    adapted.model.register_forward_pre_hook(
        lambda _, args, kwargs: positions.append(kwargs["input_ids"].numel()), with_kwargs=True
    )
    scored = {}
    for sort in (False, True):
        task.recipe.eval.sort_by_length = sort
        batches = task.scoring_batches(rows)
        order = [i for batch in batches for i in batch]
        assert sorted(order) == list(range(len(rows))) and [len(b) for b in batches] == [32, 32]
        assert order == (sorted(order, key=lambda i: -lengths[i]) if sort else list(range(len(rows))))
        positions.clear()
        logits, labels = predict(adapted.model, rows, adapted.tokenizer, batches, torch.device("cpu"))
        metrics, predictions = task.evaluate(adapted.model, rows, adapted.tokenizer, torch.device("cpu"))
        scored[sort] = logits, labels, sum(positions[: len(batches)]), metrics, predictions
    (plain, plain_labels, plain_padded, plain_metrics, plain_rows) = scored[False]
    (by_length, sorted_labels, sorted_padded, sorted_metrics, sorted_rows) = scored[True]
    assert plain_labels.tolist() == sorted_labels.tolist() == [row["labels"] for row in rows]
    assert torch.allclose(torch.from_numpy(plain), torch.from_numpy(by_length), atol=1e-5, rtol=0)
    assert sorted_padded < plain_padded
    assert sorted_metrics == plain_metrics and sorted_rows == plain_rows
    # scoring draws from the global RNG exactly as the DataLoader pass of earlier versions did, so a run's later
    # dropout masks, and so its weights, are what they were
    torch.manual_seed(5)
    predict(adapted.model, rows, adapted.tokenizer, task.scoring_batches(rows), torch.device("cpu"))
    after_scoring = torch.rand(3)
    torch.manual_seed(5)
    iter(DataLoader(rows, batch_size=32))  # type: ignore[arg-type]
    assert torch.equal(after_scoring, torch.rand(3))
