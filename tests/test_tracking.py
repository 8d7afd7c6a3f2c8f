"""TensorBoard logging: real short MiniLM runs read back through TensorBoard's own event reader."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from aflora_cli.cli import app
from aflora_cli.errors import AfloraError
from aflora_cli.recipe import load_recipe
from aflora_cli.training.trainer import Trainer
from runs import quick_recipe, recipe_of, run, write_recipe

TAGS = {
    "loss": "train/loss",
    "lr": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "epoch": "train/epoch",
    "trainable": "train/trainable_params",
    "frozen_pms": "train/frozen_pms",
}


def _records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _scalars(output_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(output_dir / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _assert_same_as_jsonl(output_dir: Path) -> None:
    records = _records(output_dir)
    scalars = _scalars(output_dir)
    steps = [r for r in records if "loss" in r and "event" not in r]
    evals = [r for r in records if "eval" in r]
    assert steps and evals
    expected = {tag: [(r["step"], r[key]) for r in steps] for key, tag in TAGS.items()}
    # movie_reviews evaluates on validation (first: picks the best checkpoint) and test
    assert list(evals[0]["eval"]) == ["validation", "test"]
    expected["eval/accuracy"] = [(r["step"], r["eval"]["validation"]["accuracy"]) for r in evals]
    expected["eval_test/accuracy"] = [(r["step"], r["eval"]["test"]["accuracy"]) for r in evals]
    for tag, series in expected.items():
        got = scalars[tag]
        assert [step for step, _ in got] == [step for step, _ in series], tag
        assert [value for _, value in got] == pytest.approx([v for _, v in series], rel=1e-6, abs=1e-12), tag


def test_tensorboard_series_equal_metrics_jsonl(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(quick_recipe(out, training={"max_steps": 6, "eval_every": 3}, logging={"tensorboard": True}))
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    _assert_same_as_jsonl(out)
    scalars = _scalars(out)
    assert [v for _, v in scalars["train/frozen_pms"]][-1] > 0  # the freezing shows up
    assert {tag.split("/")[0] for tag in scalars} == {"train", "eval", "eval_test"}


def test_resumed_run_appends_a_new_event_file_and_continues(tmp_path: Path) -> None:
    class Crash(Exception):
        pass

    def crash_at_step_5(kind: str, record: dict) -> None:
        if kind == "step" and record["step"] == 5:
            raise Crash

    out = tmp_path / "run"
    raw = quick_recipe(out, training={"max_steps": 8, "save_every": 3, "eval_every": 4}, logging={"tensorboard": True})
    trainer = Trainer(recipe_of(raw), on_event=crash_at_step_5)
    trainer.prepare()
    with pytest.raises(Crash):
        trainer.train()
    trainer.close()  # as the CLI does on the way out: what was logged up to step 5 is on disk
    run(raw, resume=True)
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2
    # steps 4 and 5 of the crashed run are hidden from TensorBoard, as metrics.jsonl drops them
    assert [step for step, _ in _scalars(out)["train/loss"]] == list(range(1, 9))
    _assert_same_as_jsonl(out)


def test_without_the_setting_no_tensorboard_folder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(quick_recipe(out, training={"max_steps": 2}))
    assert (out / "metrics.jsonl").is_file()
    assert not (out / "tensorboard").exists()


def test_missing_package_is_one_line_naming_the_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` now raises ImportError
    trainer = Trainer(recipe_of(quick_recipe(tmp_path / "run", logging={"tensorboard": True})))
    with pytest.raises(AfloraError) as info:
        trainer.prepare()
    message = str(info.value)
    assert "\n" not in message
    assert "pip install 'aflora[tensorboard]'" in message and message.startswith("logging.tensorboard")
    assert not (tmp_path / "run").exists()  # nothing loaded, nothing written


def test_setting_is_read_from_set_and_defaults_off(tmp_path: Path) -> None:
    raw = quick_recipe(tmp_path / "run")
    assert recipe_of(raw).logging.tensorboard is False  # recipes without the section still parse
    path = write_recipe(tmp_path / "r.yaml", raw)
    assert load_recipe(path, ["logging.tensorboard=true"]).logging.tensorboard is True
    with pytest.raises(AfloraError, match=r"logging\.wandb: unknown key"):
        load_recipe(path, ["logging.wandb=true"])


def test_dry_run_with_tensorboard_writes_nothing(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", quick_recipe(tmp_path / "out", logging={"tensorboard": True}))
    result = CliRunner().invoke(app, ["train", str(recipe), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "out").exists()


def test_tensorboard_may_be_turned_on_to_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    raw = quick_recipe(out, training={"max_steps": 4, "save_every": 2})

    class Crash(Exception):
        pass

    def crash_at_step_3(kind: str, record: dict) -> None:
        if kind == "step" and record["step"] == 3:
            raise Crash

    with pytest.raises(Crash):
        run(raw, on_event=crash_at_step_3)
    run({**raw, "logging": {"tensorboard": True}}, resume=True)  # logging is no part of the recipe check
    assert [step for step, _ in _scalars(out)["train/loss"]] == [3, 4]
    losses = {r["step"]: r["loss"] for r in _records(out) if "loss" in r}
    assert [v for _, v in _scalars(out)["train/loss"]] == pytest.approx([losses[3], losses[4]], rel=1e-6)
