"""AfloraCallback in the Hugging Face Trainer and TRL's SFTTrainer: the schedule, the optimizer, checkpoints the
commands read, resume, and misuse."""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_runs import (
    CONFIG,
    REVIEWS_DATA,
    SAVE_EVERY,
    STEPS,
    assert_schedule_followed,
    classifier_trainer,
    manifest,
    resume_copy,
    review_files,
    sft_trainer,
    weights,
)
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Trainer, TrainingArguments

from aflora_cli import (
    AfloraCallback,
    AfloraConfig,
    AfloraError,
    add_adapters,
    load_checkpoint,
    merge_adapters,
    model_dir,
)
from aflora_cli.commands.inspection import inspect_checkpoint
from aflora_cli.commands.merging import merge_checkpoint
from aflora_cli.commands.scoring import evaluate_checkpoint
from aflora_cli.engine.manifest import FREEZER_FILE
from aflora_cli.training.trainer import epoch_batches
from runs import MINILM, quick_recipe, run
from tiny_models import tiny_bert


@functools.cache
def _classifier_run() -> tuple[Path, Trainer]:
    out = Path(tempfile.mkdtemp(prefix="aflora-hf-trainer-"))
    trainer = classifier_trainer(out / "run")
    trainer.train()
    return out / "run", trainer


@functools.cache
def _sft_run() -> tuple[Path, Any]:
    out = Path(tempfile.mkdtemp(prefix="aflora-sft-"))
    trainer = sft_trainer(out / "run", review_files(out / "data"))
    trainer.train()
    return out / "run", trainer


@pytest.fixture(scope="module", autouse=True)
def _cleanup() -> Any:
    yield
    for cached in (_classifier_run, _sft_run):
        if cached.cache_info().currsize:
            shutil.rmtree(cached()[0].parent, ignore_errors=True)
        cached.cache_clear()


RUNS = {"trainer": _classifier_run, "sft": _sft_run}


@pytest.mark.parametrize("kind", RUNS)
def test_freezes_floor_r_t_n_pms_at_every_step(kind: str) -> None:
    run, _ = RUNS[kind]()
    final = manifest(run / f"checkpoint-{STEPS}")
    assert final["step"] == STEPS
    assert_schedule_followed(final)
    assert all(step is not None for step in final["freeze_log"].values())  # the ramp ends before T - t_f
    assert final["trainable_params"]["end"] < final["trainable_params"]["start"]
    # the mid-run checkpoint holds the log as it was then
    assert_schedule_followed(manifest(run / f"checkpoint-{SAVE_EVERY}"))


@pytest.mark.parametrize("kind", RUNS)
def test_frozen_pms_leave_the_optimizer_and_stop_changing(kind: str) -> None:
    run, trainer = RUNS[kind]()
    log = manifest(run / f"checkpoint-{STEPS}")["freeze_log"]
    params = dict(trainer.model.named_parameters())
    state = trainer.optimizer.state
    for name in log:
        assert not params[name].requires_grad and params[name] not in state  # no AdamW moments kept
    middle, end = weights(run / f"checkpoint-{SAVE_EVERY}"), weights(run / f"checkpoint-{STEPS}")
    early = [name for name, step in log.items() if step < SAVE_EVERY]
    assert early
    for name in early:  # frozen before the update of step SAVE_EVERY - 1: the same at both checkpoints
        assert torch.equal(middle[name], end[name]), name
    vectors = [name for name in end if name.endswith("lambda_b")]
    assert any(not torch.equal(middle[name], end[name]) for name in vectors)  # the vectors kept training


@pytest.mark.parametrize("kind", RUNS)
def test_inspect_merge_and_eval_take_the_trainer_checkpoint(kind: str, tmp_path: Path) -> None:
    run, trainer = RUNS[kind]()
    checkpoint = run / f"checkpoint-{STEPS}"
    report = inspect_checkpoint(checkpoint)
    assert report["step"] == STEPS
    assert "aflora" in ModelCard.load(checkpoint / "README.md").data.tags  # the card beside the Trainer's files
    assert set(manifest(checkpoint)["freeze_log"]) <= {matrix["name"] for matrix in report["matrices"]}
    result = evaluate_checkpoint(checkpoint)
    metric = "accuracy" if kind == "trainer" else "exact_match"
    assert 0.0 <= result.metrics[metric] <= 1.0
    merged = merge_checkpoint(checkpoint, tmp_path / "merged")
    auto = AutoModelForSequenceClassification if kind == "trainer" else AutoModelForCausalLM
    plain = auto.from_pretrained(merged.out).eval()
    model = trainer.model.eval()
    ids = torch.tensor([[5, 17, 42, 9, 3, 11]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    rebuilt = load_checkpoint(checkpoint)  # and from Python: the same model back, then folded
    with torch.no_grad():
        expected = rebuilt.model.eval()(input_ids=ids).logits
        torch.testing.assert_close(merge_adapters(rebuilt.model)(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", RUNS)
def test_resume_continues_the_freeze_log(kind: str, tmp_path: Path) -> None:
    run, _ = RUNS[kind]()
    checkpoint = resume_copy(run, tmp_path / "resumed", SAVE_EVERY)
    if kind == "trainer":  # as a checkpoint of an older version: its freezer file holds no schedule
        state = torch.load(checkpoint / FREEZER_FILE, weights_only=True)
        torch.save({key: value for key, value in state.items() if key != "schedule"}, checkpoint / FREEZER_FILE)
        older = {key: value for key, value in manifest(checkpoint).items() if key != "checksums"}  # nor checksums
        (checkpoint / "adapter_config.json").write_text(json.dumps(older), encoding="utf-8")
        resumed = classifier_trainer(tmp_path / "resumed")
    else:
        resumed = sft_trainer(tmp_path / "resumed", Path(manifest(checkpoint)["recipe"]["data"]["train_file"]))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    whole, again = manifest(run / f"checkpoint-{STEPS}"), manifest(tmp_path / "resumed" / f"checkpoint-{STEPS}")
    assert again["freeze_log"] == whole["freeze_log"]
    assert again["trainable_params"] == whole["trainable_params"]
    first, second = weights(run / f"checkpoint-{STEPS}"), weights(tmp_path / "resumed" / f"checkpoint-{STEPS}")
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=1e-5, atol=1e-6)


def test_sigterm_saves_and_stops_the_trainer_at_the_step_and_resuming_continues_alike(tmp_path: Path) -> None:
    """A SIGTERM during step 3: AfloraCallback asks the Trainer to save checkpoint-3 and stop; resuming from it
    ends with the freeze log of the uninterrupted run."""
    import os
    import signal

    from transformers import TrainerCallback

    class TermAtStep3(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    callback = AfloraCallback(CONFIG, data=REVIEWS_DATA, max_length=32)
    stopped = classifier_trainer(tmp_path / "run", callbacks=[TermAtStep3(), callback])
    stopped.train()
    assert stopped.state.global_step == 3 and callback.stopped_by == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert manifest(checkpoint)["step"] == 3 and (checkpoint / FREEZER_FILE).is_file()
    resumed = classifier_trainer(tmp_path / "run")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    whole, _ = _classifier_run()
    assert (
        manifest(tmp_path / "run" / f"checkpoint-{STEPS}")["freeze_log"]
        == manifest(whole / f"checkpoint-{STEPS}")["freeze_log"]
    )


def test_resume_with_another_step_count_is_refused_in_one_line(tmp_path: Path) -> None:
    """The freezer file holds the schedule its log was laid out for; resuming with another max_steps would
    continue a log that follows Eq. 5 for neither schedule, so the callback refuses (old checkpoints, without
    the schedule in that file, are checked against their manifest)."""
    run, _ = _classifier_run()
    checkpoint = resume_copy(run, tmp_path / "longer", SAVE_EVERY)
    state = torch.load(checkpoint / FREEZER_FILE, weights_only=True)
    for old in (False, True):
        if old:
            assert state["schedule"] == {"total_steps": STEPS, "t_i": 2, "t_f": 4}
            torch.save({key: value for key, value in state.items() if key != "schedule"}, checkpoint / FREEZER_FILE)
        older = {key: value for key, value in manifest(checkpoint).items() if key != "checksums"}  # nor checksums
        (checkpoint / "adapter_config.json").write_text(json.dumps(older), encoding="utf-8")
        trainer = classifier_trainer(tmp_path / "longer", max_steps=STEPS + 8)
        with pytest.raises(AfloraError) as raised:
            trainer.train(resume_from_checkpoint=str(checkpoint))
        message = str(raised.value)
        assert "\n" not in message, message
        assert f"{checkpoint} froze its PMs on a schedule of T = {STEPS} steps (t_i = 2, t_f = 4)" in message
        assert f"this run has T = {STEPS + 8} (t_i = 2, t_f = 4); resume with the run's max_steps" in message
    assert sorted(path.name for path in (tmp_path / "longer").iterdir()) == [f"checkpoint-{SAVE_EVERY}"]


# ---- misuse: one clear error while the Trainer is built ----------------------------------------------------


def _build_refused(model: torch.nn.Module, callbacks: list[Any], tmp_path: Path, *fragments: str) -> None:
    rows = [{"input_ids": [1, 5, 7, 2], "attention_mask": [1, 1, 1, 1], "labels": 0}] * 8
    args = TrainingArguments(str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[], use_cpu=True)
    with pytest.raises(AfloraError) as raised:
        Trainer(model=model, args=args, train_dataset=rows, callbacks=callbacks)
    message = str(raised.value)
    assert "\n" not in message and all(fragment in message for fragment in fragments), message


def test_callback_without_adapters_is_refused(tmp_path: Path) -> None:
    callbacks = [AfloraCallback(CONFIG, data=REVIEWS_DATA)]
    _build_refused(tiny_bert(), callbacks, tmp_path, "no aflora adapters", "add_adapters")


def test_two_callbacks_are_refused(tmp_path: Path) -> None:
    model = tiny_bert()
    add_adapters(model, CONFIG)
    callbacks = [AfloraCallback(CONFIG, data=REVIEWS_DATA), AfloraCallback(CONFIG, data=REVIEWS_DATA)]
    _build_refused(model, callbacks, tmp_path, "two AfloraCallbacks")


def test_adapters_added_with_other_settings_are_refused(tmp_path: Path) -> None:
    model = tiny_bert()
    add_adapters(model, AfloraConfig(adapter={"rank": 8}, freezing={"t_i": 2, "t_f": 4}))
    callbacks = [AfloraCallback(CONFIG, data=REVIEWS_DATA)]
    _build_refused(model, callbacks, tmp_path, "other settings", "adapter.rank")


def test_a_model_of_another_family_than_the_data_is_refused_before_any_step(tmp_path: Path) -> None:
    from hf_runs import tiny_model_dir

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    add_adapters(model, CONFIG)
    rows = [{"input_ids": [1, 5, 7, 2], "attention_mask": [1, 1, 1, 1], "labels": [1, 5, 7, 2]}] * 8
    args = TrainingArguments(str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[AfloraCallback(CONFIG, data=REVIEWS_DATA)])
    with pytest.raises(AfloraError, match=r"'movie_reviews' trains a classification model .* LlamaForCausalLM"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_bad_settings_are_one_line_at_construction() -> None:
    with pytest.raises(AfloraError, match=r"data: bogus: Extra inputs"):
        AfloraCallback(CONFIG, data={"task": "movie_reviews", "bogus": 1})
    with pytest.raises(AfloraError, match=r"config: adapter.rank: Input should be greater than 0"):
        AfloraCallback({"adapter": {"rank": 0}}, data=REVIEWS_DATA)
    model = tiny_bert()
    add_adapters(model)
    with pytest.raises(AfloraError, match="already has aflora adapters"):
        add_adapters(model)


# ---- the same run through `aflora train` and through Trainer + callback ------------------------------------


class _AfloraOrder(torch.utils.data.Sampler[int]):
    """The rows in the order `aflora train` takes them (epoch_batches), epoch by epoch."""

    def __init__(self, rows: int, seed: int, batch_size: int) -> None:
        self.rows, self.seed, self.batch_size, self.epoch = rows, seed, batch_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Any:
        batches = epoch_batches(self.rows, self.epoch, self.seed, 0, 1, self.batch_size)
        return iter([row for batch in batches for row in batch])

    def __len__(self) -> int:
        return self.rows


def _without_dropout(base: Path, dest: Path) -> Path:
    """A copy of a model folder whose config turns dropout off, so both runs compute the same thing."""
    dest.mkdir()
    for file in base.iterdir():
        if file.is_file() and file.name != "config.json":
            (dest / file.name).symlink_to(file)
    config = json.loads((base / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_same_rows_order_and_seed_give_the_freeze_log_of_aflora_train(tmp_path: Path) -> None:
    base = _without_dropout(model_dir(MINILM), tmp_path / "base")
    raw = quick_recipe(
        tmp_path / "cli",
        model={"name_or_path": str(base)},
        freezing={"t_i": 2, "t_f": 4},
        training={
            "max_steps": STEPS,
            "batch_size": 8,
            "max_length": 32,
            "lr": 1e-2,
            "warmup_ratio": 0.0,
            "weight_decay": 0.0,
            "max_grad_norm": None,  # the Trainer clips before its callbacks see the gradients, aflora train after
        },
    )
    cli = run(raw)

    # the same set-up as Trainer.prepare, in the same order: seed, rows, model with head, adapters
    torch.manual_seed(raw["seed"])
    task, tokenizer = cli.task, cli.adapted.tokenizer
    rows = task.load_splits(tokenizer, ["train"]).train
    model = task.load_model(base, tokenizer)
    config = AfloraConfig(adapter=raw["adapter"], freezing=raw["freezing"])
    add_adapters(model, config)

    class SameOrderTrainer(Trainer):
        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            return _AfloraOrder(len(rows), raw["seed"], 8)

    args = TrainingArguments(
        str(tmp_path / "hf"),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        weight_decay=0.0,
        warmup_steps=0,
        max_grad_norm=0.0,  # off
        optim="adamw_torch",
        seed=raw["seed"],
        remove_unused_columns=False,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    callback = AfloraCallback(config, data=raw["data"], base_model=str(base))
    trainer = SameOrderTrainer(
        model=model, args=args, train_dataset=rows, data_collator=task.collate(tokenizer), callbacks=[callback]
    )
    trainer.train()
    assert callback.freezer is not None
    assert callback.freezer.freeze_log == cli.freezer.freeze_log
    assert sum(step is not None for step in cli.freezer.freeze_log.values()) == len(cli.freezer.freeze_log)


def test_own_loop_with_start_freezing_then_save_and_load(tmp_path: Path) -> None:
    """The README's loop without a Trainer: schedule followed, checkpoint written, rebuilt, merged."""
    from hf_runs import review_dataset
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from aflora_cli import release_from_optimizer, save_adapters

    torch.manual_seed(0)
    base = model_dir(MINILM)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    adapters = add_adapters(model, CONFIG)
    freezer = adapters.start_freezing(model, total_steps=STEPS, steps_per_epoch=STEPS)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rows, collate = review_dataset(tokenizer, 8 * STEPS), DataCollatorWithPadding(tokenizer)
    for step in range(STEPS):
        batch = collate([rows[i] for i in range(step * 8, (step + 1) * 8)])
        model(**batch).loss.backward()
        freezer.update_scores(step)
        release_from_optimizer(optimizer, freezer.apply_schedule(step))
        optimizer.step()
        optimizer.zero_grad()
    frozen = {id(p) for name, p in freezer.matrices.items() if freezer.freeze_log[name] is not None}
    assert frozen and not frozen & {id(p) for group in optimizer.param_groups for p in group["params"]}
    saved = save_adapters(model, tmp_path / "ckpt", data=REVIEWS_DATA, step=STEPS, tokenizer=tokenizer)
    assert_schedule_followed(manifest(saved))
    assert ModelCard.load(saved / "README.md").data.base_model is None  # the local tiny BERT is no Hub id
    rebuilt = load_checkpoint(saved)
    ids = torch.tensor([[101, 2023, 3185, 2001, 2307, 102]])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.model.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    assert evaluate_checkpoint(saved).metrics["accuracy"] >= 0.0


def test_data_that_is_invalid_as_a_whole_names_the_argument() -> None:
    with pytest.raises(AfloraError, match=r"^AfloraCallback data: Value error, task 'custom' needs train_file"):
        AfloraCallback(CONFIG, data={"task": "custom", "format": "chat"})


def test_ddp_without_unused_parameter_search_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import TrainerControl, TrainerState
    from transformers.training_args import ParallelMode

    model = tiny_bert()
    add_adapters(model, CONFIG)
    callback = AfloraCallback(CONFIG, data=REVIEWS_DATA)
    args = TrainingArguments(str(tmp_path), ddp_find_unused_parameters=False, report_to=[], use_cpu=True)
    monkeypatch.setattr(TrainingArguments, "parallel_mode", property(lambda self: ParallelMode.DISTRIBUTED))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(AfloraError, match="ddp_find_unused_parameters=False cannot work"):
        callback.on_train_begin(args, TrainerState(max_steps=4), TrainerControl(), model=model, optimizer=optimizer)


def test_the_trainers_fsdp_is_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FSDP through the Trainer's `fsdp` argument, or through `accelerate launch` with an FSDP config (which sets
    ACCELERATE_USE_FSDP): refused while the Trainer is built, saying what to do instead."""
    from transformers import TrainerControl, TrainerState

    model = tiny_bert()
    add_adapters(model, CONFIG)
    callback = AfloraCallback(CONFIG, data=REVIEWS_DATA)
    fragments = ("the Trainer's FSDP", "not supported", "train under DDP", "training.fsdp")
    args = TrainingArguments(str(tmp_path), fsdp=True, report_to=[], use_cpu=True)
    with pytest.raises(AfloraError) as raised:
        callback.on_init_end(args, TrainerState(), TrainerControl(), model=model)
    assert raised.value.args[0].startswith("AfloraCallback: ") and "\n" not in str(raised.value)
    assert all(fragment in str(raised.value) for fragment in fragments)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    _build_refused(model, [callback], tmp_path, *fragments)
