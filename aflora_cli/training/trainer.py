"""The training loop: AdamW with linear warmup and decay, the freezer between the final gradients and the
optimizer step, evaluation and checkpoints on a cadence, exact resume, and DDP across processes."""

from __future__ import annotations

import json
import math
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from aflora_cli.adapted.building import AdaptedModel, RunLayout, build_adapted, load_base, run_manifest, task_for
from aflora_cli.adapted.model_card import checkpoint_card
from aflora_cli.engine.checkpoint import (
    adapter_parameters,
    find_checkpoint,
    load_weights_into,
    read_state,
    read_weights,
    restore,
    save_checkpoint,
)
from aflora_cli.engine.config import AUTO, check_ramp, resolve_schedule
from aflora_cli.engine.durable import STOP_SIGNALS, write_text_durably
from aflora_cli.engine.freezing import Freezer
from aflora_cli.engine.inject import adaptive_matrices, resolve_policy
from aflora_cli.engine.manifest import STATE_FILE, read_manifest, verify_checksums
from aflora_cli.engine.params import count_trainable
from aflora_cli.engine.storage import place
from aflora_cli.errors import AfloraError
from aflora_cli.recipe import Recipe, differing_key, parse_recipe
from aflora_cli.tasks import Prediction, Row, Task, TaskData
from aflora_cli.tasks.packing import check_packed_attention
from aflora_cli.training import distributed, sharding
from aflora_cli.training.output_lock import OutputLock
from aflora_cli.training.step import TrainingStep, build_optimizer, linear_schedule
from aflora_cli.training.tracking import RunInfo, RunTrackers, open_trackers, require, run_name

EventHandler = Callable[[str, dict[str, Any]], None]
METRICS_FILE = "metrics.jsonl"


class TrainingStopped(Exception):
    """The run was asked to stop by a signal and stopped after a whole optimizer step, with `last` saved."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number (143 SIGTERM, 130 SIGINT,
        138 SIGUSR1 on Linux)."""
        return 128 + self.signum


@dataclass(frozen=True)
class Schedule:
    """How the run is laid out in optimizer steps."""

    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    t_i: int
    t_f: int


def plan_schedule(recipe: Recipe, train_rows: int, world_size: int) -> Schedule:
    """Steps per epoch, total steps T, warmup, t_i and t_f, all in optimizer steps."""
    cfg = recipe.training
    rows_per_rank = math.ceil(train_rows / world_size)
    micro = math.ceil(rows_per_rank / cfg.batch_size)
    per_epoch = math.ceil(micro / cfg.gradient_accumulation)
    total = cfg.max_steps or math.ceil(cfg.epochs * per_epoch)
    t_i, t_f = resolve_schedule(recipe.freezing, per_epoch, total)
    return Schedule(micro, per_epoch, total, math.ceil(cfg.warmup_ratio * total), t_i, t_f)


def check_schedule(recipe: Recipe, schedule: Schedule) -> None:
    """A run with adaptive PMs must have a ramp to freeze them on (Eq. 5); refused in one line otherwise, before
    any model loads."""
    policy = resolve_policy(recipe.adapter)
    targeted = recipe.adapter.targets.keys() if recipe.adapter.targets is not None else policy.keys()
    if not any(policy[kind] == "adaptive" for kind in targeted):
        return
    cfg = recipe.training
    total_is = (
        "training.max_steps"
        if cfg.max_steps
        else f"training.epochs = {cfg.epochs:g} x {schedule.steps_per_epoch} steps per epoch"
    )
    check_ramp(recipe.freezing, schedule.t_i, schedule.t_f, schedule.total_steps, total_is=total_is, key="freezing")


def _layout(layout: dict[str, Any]) -> str:
    return (
        f"T = {layout['total_steps']} steps ({layout['steps_per_epoch']} per epoch, t_i = {layout['t_i']}, "
        f"t_f = {layout['t_f']})"
    )


MEGABATCH = 50  # batches per group sorted by length, as in the Hugging Face Trainer's length grouping


def epoch_batches(
    rows: int,
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    batch_size: int,
    lengths: Sequence[int] | None = None,
) -> list[list[int]]:
    """This rank's micro-batches (row indices) for one epoch: a seeded shuffle, padded and dealt out.

    With `lengths`, rows are grouped by length so batches waste little padding: the shuffled order is cut
    into megabatches of MEGABATCH·batch_size·world_size rows, each sorted longest first; every rank then
    takes its rows from the same sorted megabatches. Still a function of (seed, epoch) alone, so a resumed
    run sees the same batches.
    """
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(rows, generator=generator).tolist()
    if lengths is not None:
        size = MEGABATCH * batch_size * world_size
        megabatches = [order[i : i + size] for i in range(0, rows, size)]
        order = [row for mega in megabatches for row in sorted(mega, key=lambda r: -lengths[r])]
    per_rank = math.ceil(rows / world_size)
    order += order[: per_rank * world_size - rows]
    if lengths is not None:  # deal out whole batches of neighbours so each rank's batches stay uniform
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        mine = [row for chunk in chunks[rank::world_size] for row in chunk]
    else:
        mine = order[rank::world_size]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


class Trainer:
    """One training run of a recipe; `prepare()` loads everything, `train()` runs to the end."""

    def __init__(self, recipe: Recipe, *, resume: bool = False, on_event: EventHandler | None = None) -> None:
        self.recipe = recipe
        self.resume = resume
        self.on_event = on_event or (lambda kind, record: None)
        self.output_dir = Path(recipe.output_dir)
        self.step = 0
        self.best: dict[str, Any] | None = None
        self.start_eval: dict[str, Any] | None = None
        self.predictions: dict[str, list[Prediction]] = {}
        self.start_predictions: dict[str, list[Prediction]] = {}
        self.tracker: RunTrackers | None = None
        self.lock = OutputLock(self.output_dir)
        self.resume_from = self.output_dir / "last"  # or its predecessor, if a kill left only that
        self.stop_signal: int | None = None  # set by SIGTERM/SIGINT/SIGUSR1: stop after the current step
        self.saved_step = -1  # the step `last` was last written at
        self.nonfinite_steps = 0  # non-finite optimizer steps in a row

    # ---- set-up ----------------------------------------------------------------------------------
    def _check_output_dir(self) -> dict[str, Any] | None:
        """The manifest of the run to resume, or None for a fresh run into a free output_dir."""
        last = self.output_dir / "last"
        if self.resume:
            if self.lock.held:  # the one writer puts back what a kill between two renames left aside
                restore(self.output_dir / "best")
            found = restore(last) if self.lock.held else find_checkpoint(last)
            if found is None:
                if (self.output_dir / METRICS_FILE).exists():
                    return None  # a run stopped before its first checkpoint: it starts over (see prepare)
                raise AfloraError(f"output_dir {self.output_dir}: no checkpoint to resume ({last} is missing)")
            self.resume_from = last = found
            manifest = read_manifest(last)
            verify_checksums(last, manifest)
            # read the saved recipe through today's schema: keys added since then take their defaults
            saved_recipe = parse_recipe(manifest["recipe"], f"{last}/adapter_config.json (recipe)")
            self._continue_schedule(saved_recipe)
            saved = saved_recipe.model_dump(mode="json")
            current = self.recipe.model_dump(mode="json")
            for dumped in (saved, current):
                dumped.pop("logging")  # where metrics go changes no result: TensorBoard may be turned on to resume
            key = differing_key(saved, current)
            if key:
                raise AfloraError(
                    f"{last}: the run was started with another recipe (it differs at {key}); "
                    "resume with the same recipe"
                )
            return manifest
        if last.exists() or (self.output_dir / METRICS_FILE).exists():
            raise AfloraError(
                f"output_dir {self.output_dir} already holds a run; pass --resume to continue it "
                "or choose another output_dir"
            )
        return None

    def _continue_schedule(self, saved: Recipe) -> None:
        """t_i / t_f left `auto` continue what the resumed run used: a run saved before `auto` existed (its
        recipe says `1 epoch` and `70%`, the old defaults) then resumes on the very schedule it started with."""
        freezing = self.recipe.freezing
        keep = {key: getattr(saved.freezing, key) for key in ("t_i", "t_f") if getattr(freezing, key) == AUTO}
        if keep:
            self.recipe = self.recipe.model_copy(update={"freezing": freezing.model_copy(update=keep)})

    def prepare(self) -> None:
        """Load model and data, inject adapters, build freezer, optimizer and schedule (and resume state)."""
        try:
            self._prepare()
        except BaseException:
            self.lock.release()  # a run refused or failed while starting leaves output_dir to the next one
            raise

    def _prepare(self) -> None:
        recipe = self.recipe
        if recipe.device == "cuda" and not torch.cuda.is_available():
            raise AfloraError("device: cuda was asked for, but torch sees no CUDA device; use auto or cpu")
        if recipe.precision == "fp16" and (recipe.device == "cpu" or not torch.cuda.is_available()):
            raise AfloraError("precision: fp16 needs CUDA; use fp32 or bf16 on the CPU")
        storage = recipe.model.storage()
        if self._is_writer() and self.output_dir.is_dir():
            self.lock.acquire()  # before anything in output_dir is read or changed
        resumed = self._check_output_dir()
        if self.resume and resumed is None and self.group_rank() == 0:
            (self.output_dir / METRICS_FILE).unlink(missing_ok=True)  # never checkpointed: start over
        recipe = self.recipe  # resuming, t_i / t_f left auto take the saved run's values
        # on every rank and before any loading, so a missing package fails at once and everywhere alike
        trackers = recipe.logging.trackers()
        require(trackers, from_tensorboard_key=recipe.logging.tensorboard)
        self.group = distributed.setup(recipe.device)
        storage.check(self.group.device)
        torch.manual_seed(recipe.seed)
        base = load_base(recipe)
        self.task: Task = task_for(recipe, base)
        sharding.check_fsdp(recipe, self.task.family, self.group)
        if recipe.training.packing:
            self.task.packed_collate(base.tokenizer)  # refused in one line where packing cannot work
        self.data: TaskData = self._load_data(base.tokenizer)
        assert self.data.train is not None  # every split is loaded when none is named
        self.train_set: Sequence[Row] = self.data.train
        if not self.train_set:
            why = self.data.why_skipped.get("train")
            raise AfloraError(f"data: no training rows left: every row was skipped{f' ({why})' if why else ''}")
        self.schedule = plan_schedule(recipe, len(self.train_set), self.group.world_size)
        if resumed is not None:
            self._check_layout(resumed)  # a resumed run keeps the schedule it was started on
        else:
            check_schedule(recipe, self.schedule)
        self.adapted: AdaptedModel = build_adapted(recipe, self.task, base, self.group.device)
        if recipe.training.gradient_checkpointing:
            self._checkpoint_activations()
        fsdp = recipe.training.fsdp
        if fsdp is not None:
            whole = adapter_parameters(self.adapted.model, self.adapted.head_names).values()
            sharding.shard(self.adapted.model, whole, fsdp, self.group)
            self.model = self.adapted.model
        else:
            self.model = place(self.adapted.model, self.group.device)
        if recipe.training.packing:
            self._check_packing()
        self.freezer = Freezer.from_config(
            adaptive_matrices(self.model, self.adapted.targets),
            recipe.freezing,
            total_steps=self.schedule.total_steps,
            t_i=self.schedule.t_i,
            t_f=self.schedule.t_f,
        )
        self.start_counts = count_trainable(self.model, self.adapted.head_names)
        if resumed is not None:
            self._load_weights_and_freezer()
        frozen_numel = self.start_counts[0] - count_trainable(self.model, self.adapted.head_names)[0]
        self.optimizer = build_optimizer(self.model, self.adapted.head_names, recipe.training)
        self.scheduler = linear_schedule(self.optimizer, self.schedule.warmup_steps, self.schedule.total_steps)
        self.scaler = torch.amp.GradScaler(self.group.device.type, enabled=recipe.precision == "fp16")
        if resumed is not None:
            self._load_training_state()
        else:
            torch.manual_seed(recipe.seed + self.group.rank)  # dropout differs across ranks
        self.steps = TrainingStep(
            self.model,
            self.freezer,
            self.optimizer,
            self.scheduler,
            self.scaler,
            self.group,
            recipe.precision,
            recipe.training.max_grad_norm,
            frozen_numel,
            sharded=fsdp is not None,
        )
        if trackers and self.group.is_main:
            run = RunInfo(
                self.output_dir,
                recipe.logging.project,
                run_name(recipe.logging.run_name, self.output_dir),
                recipe.model_dump(mode="json"),
                resume_step=self.step,
            )
            self.tracker = open_trackers(trackers, run)

    def _load_data(self, tokenizer: Any) -> TaskData:
        """Every split, encoded. Under DDP the main process goes first and fills the encoded-rows cache; the
        others wait for it and read from the cache instead of tokenizing the same rows again."""
        if not self.group.is_main:
            self.group.barrier()
        data = self.task.load_splits(tokenizer)
        if self.group.is_main:
            self.group.barrier()
        return data

    # ---- resume ----------------------------------------------------------------------------------
    def _check_layout(self, manifest: dict[str, Any]) -> None:
        """The same recipe can still lay the run out differently (the train file changed, or the number of
        processes): the saved freeze log and data position then belong to another schedule, so refuse."""
        saved, sched = manifest.get("freezing") or {}, self.schedule
        now = {key: getattr(sched, key) for key in ("total_steps", "steps_per_epoch", "t_i", "t_f")}
        if all(saved.get(key) == value for key, value in now.items()):
            return
        old = {key: saved.get(key) for key in now}
        raise AfloraError(
            f"{self.output_dir / 'last'}: the run was laid out for {_layout(old)}, this one for {_layout(now)} "
            f"({len(self.train_set)} training rows on {self.group.world_size} process(es)); resume with the same "
            "training data and number of processes, or start a new run in another output_dir"
        )

    @staticmethod
    def group_rank() -> int:
        """This process's rank as the launcher set it (known before the process group is joined)."""
        return int(os.environ.get("RANK", "0"))

    def _is_writer(self) -> bool:
        """Only rank 0 writes output_dir, and so only it holds the lock."""
        return self.group_rank() == 0 and not self.lock.held

    def _load_weights_and_freezer(self) -> None:
        last = self.resume_from
        if not last.is_dir():  # rank 0 put a predecessor back in place meanwhile
            last = self.output_dir / "last"
        load_weights_into(self.model, read_weights(last), self.adapted.head_names, last)
        if not (last / STATE_FILE).is_file():
            raise AfloraError(f"{last}: {STATE_FILE} is missing (it holds what --resume needs: optimizer, RNG, step)")
        self.state = read_state(last / STATE_FILE)
        processes = len(self.state["rng"])
        if processes != self.group.world_size:
            raise AfloraError(
                f"{last}: the run was trained on {processes} process(es), this one has {self.group.world_size}; "
                f"resume with {processes}, or start a new run in another output_dir"
            )
        self.freezer.load_state_dict(self.state["freezer"])

    def _load_training_state(self) -> None:
        state = self.state
        self.step = self.saved_step = state["step"]
        self.best = state["best"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"][self.group.rank]["cpu"])
        if torch.cuda.is_available() and state["rng"][self.group.rank].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"][self.group.rank]["cuda"])
        self._truncate_metrics()
        del self.state

    def _truncate_metrics(self) -> None:
        """Drop log records written after the checkpoint we resume from."""
        path = self.output_dir / METRICS_FILE
        if self.group.is_main and path.exists():
            lines = path.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if _record_step(line) <= self.step]
            write_text_durably(path, "".join(line + "\n" for line in kept))

    # ---- the loop --------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run from the current step to T; returns the final evaluation. A SIGTERM, SIGINT or SIGUSR1 stops it
        after the current optimizer step with `last` saved (TrainingStopped); a second SIGINT aborts at once."""
        if self._is_writer():
            self.lock.acquire()
        with self._stop_signals():
            return self._train()

    @contextmanager
    def _stop_signals(self) -> Iterator[None]:
        """Catch the stop signals while training (main thread only: elsewhere they keep their handlers)."""
        try:
            previous = {signum: signal.signal(signum, self._on_stop_signal) for signum in STOP_SIGNALS}
        except ValueError:  # not the main thread
            previous = {}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        if self.stop_signal is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop at once (`last` stays whole: saves are atomic)
            return
        self.stop_signal = signum
        self._emit("stopping", {"step": self.step, "signal": signal.Signals(signum).name})

    def _stop_requested(self) -> int:
        """The signal any rank was sent (0: none); every rank asks at every step, so all stop at the same one."""
        return self.group.max_int(self.stop_signal or 0)

    def _train(self) -> dict[str, Any]:
        sched = self.schedule
        accum = self.recipe.training.gradient_accumulation
        tokenizer = self.adapted.tokenizer
        collate = self.task.packed_collate(tokenizer) if self.recipe.training.packing else self.task.collate(tokenizer)
        lengths = self.task.lengths(self.train_set) if self.recipe.training.group_by_length else None
        self.model.train()
        self._emit("start", {"step": self.step, "total_steps": sched.total_steps, **self._counts()})
        self._report_data()
        if self.step == 0 and self.recipe.training.eval_on_start:
            self.start_eval = self._evaluate()
            self.start_predictions = dict(self.predictions)
        final: dict[str, Any] = {}
        while self.step < sched.total_steps:
            epoch, within = divmod(self.step, sched.steps_per_epoch)
            batches = epoch_batches(
                len(self.train_set),
                epoch,
                self.recipe.seed,
                self.group.rank,
                self.group.world_size,
                self.recipe.training.batch_size,
                lengths,
            )
            # its own generator: a DataLoader would otherwise draw from the global RNG that dropout uses
            loader = iter(
                DataLoader(
                    self.train_set,  # type: ignore[arg-type]
                    batch_sampler=batches[within * accum :],
                    collate_fn=collate,
                    generator=torch.Generator(),
                )
            )
            for position in range(within, sched.steps_per_epoch):
                if self.step >= sched.total_steps:
                    break
                count = min(accum, sched.micro_batches_per_epoch - position * accum)
                loss = self.steps.forward_backward([next(loader) for _ in range(count)])
                outcome = self.steps.optimizer_step(loss, self.step)
                self.step += 1
                record = {
                    "step": self.step,
                    "epoch": self.step / sched.steps_per_epoch,
                    "loss": float(loss),
                    **outcome,
                    **self._counts(),
                }
                self._check_divergence(outcome)
                if not outcome["finite"]:
                    self._log(
                        {
                            "step": self.step,
                            "event": "skipped_nonfinite",
                            "loss": record["loss"],
                            "grad_norm": record["grad_norm"],
                        }
                    )
                if self.step % self.recipe.training.log_every == 0 or outcome["newly_frozen"]:
                    self._log(
                        {
                            key: record[key]
                            for key in ("step", "epoch", "loss", "lr", "grad_norm", "trainable", "frozen_pms")
                        }
                    )
                self._emit("step", record)
                final = self._cadence(epoch_end=position == sched.steps_per_epoch - 1) or final
                signum = self._stop_requested()
                if signum and self.step < sched.total_steps:
                    if self.saved_step != self.step:
                        self._save(None, save_last=True)
                    self._close_trackers()
                    raise TrainingStopped(signum, self.step)
        self._close_trackers()
        return final

    def _check_divergence(self, outcome: dict[str, Any]) -> None:
        """Stop a run whose steps keep coming out non-finite: skipping them would only pretend to train."""
        limit = self.recipe.training.max_nonfinite_steps
        self.nonfinite_steps = 0 if outcome["finite"] else self.nonfinite_steps + 1
        if limit is not None and self.nonfinite_steps >= limit:
            raise AfloraError(self._diverged(f"{limit} non-finite steps in a row", outcome["lr"]))

    def _diverged(self, what: str, lr: float) -> str:
        held = f"{self.output_dir / 'last'} holds step {self.saved_step}" if self.saved_step >= 0 else "nothing saved"
        return (
            f"training diverged at step {self.step} (lr {lr:.3g}): {what}; {held}, the last finite state; "
            "lower training.lr (or raise training.warmup_ratio) and start again"
        )

    def _counts(self) -> dict[str, int]:
        without, with_head = self.start_counts
        return {
            "trainable": without - self.steps.frozen_numel,
            "trainable_with_head": with_head - self.steps.frozen_numel,
            "frozen_pms": self.freezer.num_frozen,
        }

    def _cadence(self, epoch_end: bool) -> dict[str, Any] | None:
        """Evaluate and save when the recipe's cadence (or the epoch's or run's end) says so."""
        cfg = self.recipe.training
        done = self.step >= self.schedule.total_steps
        evaluate_now = done or (self.step % cfg.eval_every == 0 if cfg.eval_every else epoch_end)
        save_now = done or (self.step % cfg.save_every == 0 if cfg.save_every else epoch_end)
        results = self._evaluate() if evaluate_now else None
        if save_now or evaluate_now:
            self._save(results, save_last=save_now)
        return results

    def _evaluate(self) -> dict[str, Any] | None:
        """The task's metrics on every eval split (on the main process); row predictions kept for the report.
        A sharded model runs its forward passes on every rank together (each gathers the base's shards), so
        there every rank evaluates the same rows and the main process reports them."""
        results = None
        if self.group.is_main or self.steps.sharded:
            splits: dict[str, dict[str, float]] = {}
            for split, rows in self.data.evaluation.items():

                def progress(done: int, total: int, split: str = split) -> None:
                    self._emit("eval_progress", {"step": self.step, "split": split, "done": done, "total": total})

                splits[split], self.predictions[split] = self.task.evaluate(
                    self.model, rows, self.adapted.tokenizer, self.group.device, progress
                )
            results = {"step": self.step, "epoch": self.step / self.schedule.steps_per_epoch, "eval": splits}
            self._log(results)
            self._emit("eval", results)
        self.group.barrier()
        return results

    def _report_data(self) -> None:
        """Rows that could not be encoded within the length limits are logged, never silently dropped (once, at
        the run's start); a split the encoded-rows cache could not keep is told at every start, resumes too, as
        each pays its encoding again."""
        for split, count in self.data.skipped.items():
            if count and self.step == 0:
                record = {"step": 0, "event": "skipped_rows", "split": split, "rows": count}
                self._log(record)
                self._emit("skipped_rows", record)
        for split, why in self.data.uncached.items():
            record = {"step": self.step, "event": "uncached_split", "split": split, "why": why}
            self._log(record)
            self._emit("uncached_split", record)

    def _check_packing(self) -> None:
        """Packed rows are told apart by their position ids alone, which needs the model to run without a cache
        (one turns the packed-sequence mask off); then a probe proves no row attends to the one before."""
        config: Any = self.adapted.model.config
        if getattr(config, "use_cache", None):
            config.use_cache = False
        check_packed_attention(self.model, self.group.device)

    def _checkpoint_activations(self) -> None:
        """Recompute activations in the backward pass instead of keeping them (non-reentrant: the frozen
        embeddings need no gradient for it to work)."""
        model = self.adapted.model
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise AfloraError(f"training.gradient_checkpointing: {type(model).__name__} does not support it")
        enable_activation_checkpointing(model)
        config: Any = model.config
        if getattr(config, "use_cache", None):
            config.use_cache = False  # a cache is useless while training and clashes with recomputation

    # ---- output ----------------------------------------------------------------------------------
    def _emit(self, kind: str, record: dict[str, Any]) -> None:
        if self.group.is_main:
            self.on_event(kind, record)

    def _log(self, record: dict[str, Any]) -> None:
        if self.group.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            path = self.output_dir / METRICS_FILE
            try:
                with path.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
            except OSError as err:
                held = f"; {self.output_dir / 'last'} holds step {self.saved_step}" if self.saved_step >= 0 else ""
                raise AfloraError(f"could not write {path}: {err.strerror or err}{held}") from None
            if self.tracker is not None:  # here, so the trackers and metrics.jsonl always hold the same values
                self.tracker.log(record)

    def manifest(self, results: dict[str, Any] | None) -> dict[str, Any]:
        """Everything the checkpoint says about itself, for `eval`, `merge` and `inspect`."""
        sched = self.schedule
        return run_manifest(
            self.adapted,
            self.recipe,
            self.task,
            self.freezer,
            RunLayout(sched.total_steps, sched.steps_per_epoch, sched.t_i, sched.t_f),
            self.start_counts,
            self.step,
            results["eval"] if results else None,
        )

    def _save(self, results: dict[str, Any] | None, save_last: bool) -> None:
        """Write `last` (with everything to resume) and, when the main metric improved, `best`; never a
        non-finite state."""
        if not all(bool(torch.isfinite(p).all()) for p in self.steps.trainable):
            raise AfloraError(
                self._diverged("the trainable weights are not finite", float(self.scheduler.get_last_lr()[0]))
            )
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        rngs = self.group.gather_objects(rng)
        if self.group.is_main:
            improved = self._improved(results)
            manifest = self.manifest(results)
            card = checkpoint_card(manifest)  # each checkpoint folder says what it is in a README.md
            if improved:
                save_checkpoint(self.output_dir / "best", self.model, self.adapted.head_names, manifest, extra=card)
            if save_last:
                state = {
                    "step": self.step,
                    "best": self.best,
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "freezer": self.freezer.state_dict(),
                    "rng": rngs,
                }

                def state_and_card(folder: Path) -> None:
                    torch.save(state, folder / STATE_FILE)
                    card(folder)

                save_checkpoint(
                    self.output_dir / "last", self.model, self.adapted.head_names, manifest, extra=state_and_card
                )
            self._emit("save", {"step": self.step, "best": improved, "last": save_last})
        self.group.barrier()
        if save_last:
            self.saved_step = self.step

    def _improved(self, results: dict[str, Any] | None) -> bool:
        if not results or not results["eval"]:
            return False
        metric = self.task.main_metric
        first_split = next(iter(results["eval"].values()))
        value = first_split[metric]
        if self.best is None or value > self.best["value"]:
            self.best = {"metric": metric, "value": value, "step": self.step}
            return True
        return False

    def _close_trackers(self) -> None:
        """Log the freeze events and end the trackers' runs (once)."""
        if self.tracker is not None:
            freezer = getattr(self, "freezer", None)
            self.tracker.close(freezer.freeze_log if freezer is not None else None, self.step)

    def close(self) -> None:
        """End the trackers' runs (an interrupted run keeps what it logged) and leave the process group."""
        self._close_trackers()
        self.lock.release()
        distributed.teardown()


def _record_step(line: str) -> int:
    """The step of a metrics.jsonl line; a line a kill cut short counts as after every checkpoint."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62


def enable_activation_checkpointing(model: Any) -> None:
    """Turn on non-reentrant activation checkpointing under the name this transformers has (5.24 renamed it;
    the old name warns)."""
    kwargs = {"use_reentrant": False}
    if callable(getattr(model, "activation_checkpointing_enable", None)):  # transformers >= 5.24
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
