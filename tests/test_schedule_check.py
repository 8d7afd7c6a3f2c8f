"""The freezing schedule must have a ramp (Eq. 5): `auto` defaults, the one-line refusal at plan time (CLI dry run,
Trainer, AfloraCallback), resuming a run saved before `auto`, and `inspect` on a run that froze nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from aflora_cli.cli import app
from aflora_cli.commands.inspection import inspect_checkpoint
from aflora_cli.engine.config import FreezingConfig, check_ramp, resolve_schedule
from aflora_cli.engine.manifest import read_manifest
from aflora_cli.errors import AfloraError
from aflora_cli.training import trainer as trainer_module
from aflora_cli.training.trainer import plan_schedule
from runs import quick_recipe, recipe_of, run, write_recipe
from trained_checkpoints import assert_user_error


def test_auto_takes_the_paper_values_where_they_leave_a_ramp() -> None:
    auto = FreezingConfig()
    assert (auto.t_i, auto.t_f) == ("auto", "auto")
    # 5 epochs of 100 steps: t_i = 100, T - t_f = 500 - 350 = 150, a ramp of 50 >= 5 % of 500
    assert resolve_schedule(auto, steps_per_epoch=100, total_steps=500) == (100, 350)
    # max_steps 300 below one epoch of 1000: the paper's t_i would never come; 20 % and 40 % of 300
    assert resolve_schedule(auto, steps_per_epoch=1000, total_steps=300) == (60, 120)
    # 3 epochs: 1 epoch (100) >= T - 70 % = 90, every PM would freeze at once -> 20 % and 40 %
    assert resolve_schedule(auto, steps_per_epoch=100, total_steps=300) == (60, 120)
    # only the setting left auto moves; a given one stays
    assert resolve_schedule(FreezingConfig(t_f="10%"), steps_per_epoch=1000, total_steps=300) == (60, 30)
    assert resolve_schedule(FreezingConfig(t_i=5, t_f=5), steps_per_epoch=1000, total_steps=300) == (5, 5)


def _refusal(steps: tuple[int, int], total: int, **given: Any) -> str:
    with pytest.raises(AfloraError) as caught:
        check_ramp(FreezingConfig(**given), *steps, total, total_is="training.max_steps", key="freezing")
    return str(caught.value)


def test_check_ramp_names_the_numbers_and_the_fix() -> None:
    fix = "set freezing.t_i: 20% and freezing.t_f: 40%, or leave both auto"
    assert _refusal((1000, 0), 300, t_i="1 epoch") == (
        "freezing.t_i = 1000 steps (1 epoch) >= T = 300 steps (training.max_steps): no PM would ever freeze and "
        f"the run would be LoRA with scaling vectors; {fix}"
    )
    assert _refusal((100, 210), 300, t_i="1 epoch", t_f="70%") == (
        "freezing.t_i = 100 steps (1 epoch), T - t_f = 300 - 210 (70%) = 90 steps (T from training.max_steps): "
        f"every adaptive PM would freeze at once at step 100; {fix}"
    )
    # a ramp of 14 steps over T = 300 is shorter than 5 % of T (15 steps)
    assert _refusal((100, 186), 300, t_i=100, t_f=186) == (
        "freezing.t_i = 100 steps, T - t_f = 300 - 186 = 114 steps (T from training.max_steps): the ramp would "
        f"span only 14 steps (at least 15 needed, 5% of T); {fix}"
    )
    check_ramp(FreezingConfig(), 100, 185, 300, total_is="training.max_steps", key="freezing")  # 15 steps: fine


def test_every_shipped_recipe_plans_a_ramp() -> None:
    """The schedule check on each recipe in recipes/ with a plausible training-set size."""
    from aflora_cli.recipe import load_recipe

    for path in sorted(p for p in Path("recipes").glob("*.yaml") if not p.name.startswith("sweep-")):
        recipe = load_recipe(path, [])
        for rows in (1_000, 10_000, 400_000):
            trainer_module.check_schedule(recipe, plan_schedule(recipe, rows, world_size=1))


def test_dry_run_refuses_a_schedule_that_never_freezes_before_loading_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_model(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded before the schedule was checked")

    monkeypatch.setattr(trainer_module, "build_adapted", no_model)
    raw = quick_recipe(tmp_path / "run", training={"max_steps": 6}, freezing={"t_i": "1 epoch", "t_f": "auto"})
    recipe = write_recipe(tmp_path / "recipe.yaml", raw)
    result = CliRunner().invoke(app, ["train", str(recipe), "--dry-run"])
    # 64 rows in batches of 8: 8 steps per epoch >= T = 6
    assert_user_error(
        result,
        "freezing.t_i = 8 steps (1 epoch) >= T = 6 steps (training.max_steps): no PM would ever freeze",
        "set freezing.t_i: 20% and freezing.t_f: 40%, or leave both auto",
    )
    raw["training"] = {**raw["training"], "max_steps": None, "epochs": 2}
    raw["freezing"] = {"t_i": "1 epoch", "t_f": "70%"}
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path / "recipe.yaml", raw)), "--dry-run"])
    assert_user_error(
        result,
        "freezing.t_i = 8 steps (1 epoch), T - t_f = 16 - 11 (70%) = 5 steps (T from training.epochs = 2 x 8 steps "
        "per epoch): every adaptive PM would freeze at once at step 8",
    )


def test_no_adaptive_pm_needs_no_ramp(tmp_path: Path) -> None:
    lora = quick_recipe(tmp_path / "run", adapter={"method": "lora"}, freezing={"t_i": 100, "t_f": 0})
    trainer_module.check_schedule(recipe_of(lora), plan_schedule(recipe_of(lora), 64, 1))
    only_attention = quick_recipe(
        tmp_path / "run", adapter={"targets": {"attention": ["query"]}}, freezing={"t_i": 100, "t_f": 0}
    )
    trainer_module.check_schedule(recipe_of(only_attention), plan_schedule(recipe_of(only_attention), 64, 1))
    with pytest.raises(AfloraError, match="no PM would ever freeze"):
        adaptive = quick_recipe(tmp_path / "run", freezing={"t_i": 100, "t_f": 0})
        trainer_module.check_schedule(recipe_of(adaptive), plan_schedule(recipe_of(adaptive), 64, 1))


def test_a_run_saved_on_the_old_defaults_resumes_on_its_schedule_and_inspect_says_it_froze_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before `auto`, t_i and t_f defaulted to `1 epoch` and `70%` and nothing checked the ramp: such a run froze
    nothing. Resumed with a recipe that leaves them unset (auto), it keeps that schedule, step for step."""
    old = quick_recipe(
        tmp_path / "run",
        training={"max_steps": 6},
        freezing={"t_i": "1 epoch", "t_f": "70%"},  # what an old version wrote into the manifest's recipe
    )
    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "check_schedule", lambda recipe, schedule: None)  # as the old version did
        run(old)

    last = tmp_path / "run" / "last"
    saved = read_manifest(last)
    assert (saved["freezing"]["t_i"], saved["freezing"]["t_f"]) == (8, 4)  # 1 epoch = 8 steps >= T = 6
    report = inspect_checkpoint(last)
    assert report["freezing_note"] == (
        "this run froze no adaptive PM (t_i = 8, T - t_f = 2 of T = 6: t_i >= T, so the ramp never started); it "
        "trained as LoRA with scaling vectors, every adaptive PM trainable to the end"
    )
    # the same recipe with its freezing section left out (auto) resumes on the saved layout, with no ramp refusal
    current = {key: value for key, value in old.items() if key != "freezing"}
    trainer = trainer_module.Trainer(recipe_of(current), resume=True)
    trainer.prepare()
    assert (trainer.schedule.t_i, trainer.schedule.t_f) == (8, 4)
    assert (trainer.recipe.freezing.t_i, trainer.recipe.freezing.t_f) == ("1 epoch", "70%")
    trainer.close()


def test_inspect_note_before_the_ramp_and_once_a_pm_froze() -> None:
    from aflora_cli.commands.inspection import freezing_note

    layout = {"total_steps": 10, "t_i": 4, "t_f": 2}
    waiting = [{"policy": "adaptive", "frozen_at_step": None}, {"policy": "frozen", "frozen_at_step": 0}]
    assert (
        freezing_note(waiting, layout, 3) == "no adaptive PM has frozen yet at step 3 (t_i = 4, T - t_f = 8 of T = 10)"
    )
    assert freezing_note([*waiting, {"policy": "adaptive", "frozen_at_step": 5}], layout, 10) is None
    assert freezing_note([{"policy": "trainable", "frozen_at_step": None}], layout, 10) is None


def test_callback_refuses_a_schedule_without_ramp_in_the_trainers_words(tmp_path: Path) -> None:
    from hf_runs import classifier_trainer

    trainer = classifier_trainer(tmp_path / "run", max_steps=5)  # CONFIG: t_i = 2, t_f = 4
    with pytest.raises(AfloraError) as caught:
        trainer.train()
    assert str(caught.value) == (
        "AfloraCallback: freezing.t_i = 2 steps, T - t_f = 5 - 4 = 1 steps (T from max_steps): every adaptive PM "
        "would freeze at once at step 2; set freezing.t_i: 20% and freezing.t_f: 40%, or leave both auto"
    )
    assert trainer.state.global_step == 0
