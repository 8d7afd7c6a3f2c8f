"""`aflora train` from the command line: dry run, a short run, and every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from aflora_cli.cli import app
from runs import quick_recipe, write_recipe

runner = CliRunner()


def _train(*args: str) -> Any:
    return runner.invoke(app, ["train", *args])


def _assert_one_line_error(result: Any, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output + result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_dry_run_prints_recipe_targets_and_counts_and_writes_nothing(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", quick_recipe(tmp_path / "out"))
    result = _train(str(recipe), "--dry-run", "--set", "training.max_steps=7")
    assert result.exit_code == 0, result.output
    assert "max_steps: 7" in result.output
    # one row per module kind across layers: `intermediate.dense (ffn, adaptive) in layers 0–5`
    assert "intermediate.dense" in result.output and "layers 0–5" in result.output and "adaptive" in result.output
    assert "113,040 without the head" in result.output
    assert not (tmp_path / "out").exists()


def test_a_short_run_writes_checkpoints_and_log(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", quick_recipe(tmp_path / "out"))
    result = _train(str(recipe), "--set", "training.max_steps=3")
    assert result.exit_code == 0, result.output
    assert "done: validation: accuracy" in result.output
    for folder in ("last", "best"):
        assert (tmp_path / "out" / folder / "adapter_model.safetensors").is_file()
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 3 and "eval" in records[-1]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp dirs left


def _custom(tmp_path: Path, train_rows: str, **data: Any) -> Path:
    (tmp_path / "train.csv").write_text(train_rows)
    (tmp_path / "val.csv").write_text("text,label\ngood,1\nbad,0\n")
    raw = quick_recipe(
        tmp_path / "out",
        data={
            "task": "custom",
            "train_file": "train.csv",
            "validation_file": "val.csv",
            "text_columns": ["text"],
            **data,
        },
    )
    for key in ("max_train_samples", "max_eval_samples"):
        raw["data"].pop(key)
    return write_recipe(tmp_path / "r.yaml", raw)


@pytest.mark.parametrize(
    ("make", "fragments"),
    [
        (lambda d: d / "missing.yaml", ["missing.yaml: recipe not found"]),
        (lambda d: _write(d / "r.yaml", "model: [oops\n"), ["r.yaml: invalid YAML"]),
        (
            lambda d: write_recipe(d / "r.yaml", {**quick_recipe(d / "out"), "epochz": 3}),
            ["r.yaml: epochz: unknown key"],
        ),
        (
            lambda d: write_recipe(d / "r.yaml", quick_recipe(d / "out", training={"batch_size": "large"})),
            ["r.yaml: training.batch_size"],
        ),
        (
            lambda d: write_recipe(
                d / "r.yaml", quick_recipe(d / "out", model={"name_or_path": "no-such-org/no-such-model"})
            ),
            ["model.name_or_path", "no-such-org/no-such-model"],
        ),
        (
            lambda d: write_recipe(d / "r.yaml", quick_recipe(d / "out", model={"name_or_path": "./models/minilm"})),
            ["model.name_or_path", "not found"],
        ),
        (
            lambda d: write_recipe(d / "r.yaml", quick_recipe(d / "out", precision="fp16")),
            ["precision: fp16 needs CUDA"],
        ),
        (lambda d: _custom(d, "sentence,label\nfine,1\n"), ["train.csv", "text"]),
        (lambda d: _custom(d, "text,label\nfine,1\nawful,7\n", label_names=["neg", "pos"]), ["train.csv", "7"]),
        (lambda d: _custom(d, "text,label\n"), ["train.csv", "no data rows"]),
    ],
    ids=[
        "missing",
        "bad-yaml",
        "unknown-key",
        "wrong-type",
        "hub-model",
        "local-model",
        "fp16-cpu",
        "column",
        "label",
        "empty",
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, make: Any, fragments: list[str]) -> None:
    recipe = make(tmp_path)
    _assert_one_line_error(_train(str(recipe)), *fragments)
    assert not (tmp_path / "out").exists()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_output_dir_holding_another_run_is_refused(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", quick_recipe(tmp_path / "out", training={"max_steps": 2}))
    assert _train(str(recipe)).exit_code == 0
    before = sorted(p.name for p in (tmp_path / "out").rglob("*"))
    _assert_one_line_error(_train(str(recipe)), "already holds a run", "--resume")
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == before


def test_resume_without_a_checkpoint(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", quick_recipe(tmp_path / "out"))
    _assert_one_line_error(_train(str(recipe), "--resume"), "no checkpoint to resume")
