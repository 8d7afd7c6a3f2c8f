"""`AfloraCallback`: Eqs. 2-5 inside the Hugging Face Trainer (and TRL's trainers, which are Trainers).

The Trainer owns the loop; the callback hooks three of its events:
- `on_train_begin`: checks the model's adapters against the callback's settings and lays the freezing
  schedule over the Trainer's real step count (resuming: restores the freezer from the checkpoint, and refuses
  a run laid out for another schedule — another `max_steps`, epochs or batch — whose freeze log would follow
  neither);
- `on_pre_optimizer_step`: the gradients are final there — accumulated, DDP-averaged and clipped — so it
  folds them into the scores, freezes the PMs Eq. 5 asks for and frees their optimizer state;
- `on_step_end`: after a SIGTERM, SIGINT or SIGUSR1 (on any rank), asks the Trainer to save and stop through
  its own `control.should_save` / `control.should_training_stop` (`stopped_by` then names the signal; a second
  SIGINT aborts at once);
- `on_save`: writes the adapter checkpoint (safetensors, manifest with freeze log and counts, freezer state)
  into the Trainer's `checkpoint-N` folder, so `aflora inspect / merge / eval` take that folder.

Frozen PMs keep their place in the optimizer's parameter groups (with no gradient, AdamW skips them): the
optimizer state the Trainer saves then loads into the fresh optimizer it builds when it resumes.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.training_args import ParallelMode

from aflora_cli.adapted.model_card import write_card
from aflora_cli.engine.checkpoint import read_state, write_checkpoint_files
from aflora_cli.engine.config import AUTO, check_ramp
from aflora_cli.engine.durable import STOP_SIGNALS, fsync_path
from aflora_cli.engine.freezing import Freezer, release_optimizer_state
from aflora_cli.engine.manifest import FREEZER_FILE, MANIFEST_FILE, read_manifest, verify_checksums
from aflora_cli.errors import AfloraError
from aflora_cli.library.adapters import (
    Adapters,
    AfloraConfig,
    adapter_manifest,
    adapters_of,
    as_config,
    describe_run,
    validated,
)
from aflora_cli.recipe import DataConfig, differing_key

CHECKPOINT_PREFIX = "checkpoint-"  # the Trainer's checkpoint folders: <output_dir>/checkpoint-<global step>
SCHEDULE_KEY = "schedule"  # beside the freezer state in FREEZER_FILE: the (T, t_i, t_f) it was laid out for


class AfloraCallback(TrainerCallback):
    """Adaptive freezing for a `transformers.Trainer` (or TRL `SFTTrainer`) whose model went through
    `add_adapters(model, config)` with the same `config`.

    `data` says, in a recipe's `data` keys, what the model learns (`{"task": "movie_reviews"}`, or
    `{"task": "custom", "format": "chat", "train_file": ...}`): it goes into each checkpoint's manifest so that
    `aflora eval` knows how to read and score data for it. `base_model` is the base model's hub id or directory
    (default: the `name_or_path` the model was loaded from); `max_length` is the token limit `aflora eval` uses
    (default: the Trainer arguments' `max_length` if they have one, as TRL's do, else the recipe default).
    """

    def __init__(
        self,
        config: AfloraConfig | dict[str, Any] | None = None,
        *,
        data: DataConfig | dict[str, Any],
        base_model: str | None = None,
        max_length: int | None = None,
    ) -> None:
        self.config = as_config(config, "AfloraCallback config")
        self.data = validated(DataConfig, data, "AfloraCallback data")
        self.base_model = base_model
        self.max_length = max_length
        self.adapters: Adapters | None = None
        self.stopped_by: int | None = None  # the signal that stopped training (exit with 128 + it, say)
        self._previous_handlers: dict[int, Any] = {}

    # ---- set-up -----------------------------------------------------------------------------------
    def on_init_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """Misuse fails while the Trainer is built: no adapters, other settings, a second AfloraCallback, FSDP."""
        _refuse_fsdp(args)
        if model is not None:
            self._claim(model, state)

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        processing_class: Any = None,
        train_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        """Check the set-up, build the freezer on the Trainer's step count; resuming, restore it."""
        if model is None or optimizer is None:
            raise AfloraError("AfloraCallback: the Trainer passed no model or optimizer to on_train_begin")
        _refuse_fsdp(args)
        adapters = self._claim(model, state)
        if args.parallel_mode == ParallelMode.DISTRIBUTED and args.ddp_find_unused_parameters is False:
            raise AfloraError(
                "AfloraCallback: ddp_find_unused_parameters=False cannot work: frozen PMs stop taking part in the "
                "backward pass; leave it unset or set it to True"
            )
        total = state.max_steps
        per_epoch = total
        if train_dataloader is not None and hasattr(train_dataloader, "__len__"):  # as the Trainer counts
            per_epoch = max(-(-len(train_dataloader) // args.gradient_accumulation_steps), 1)
        self.adapters = adapters
        adapters.start_freezing(model, total_steps=total, steps_per_epoch=per_epoch)
        tokenizer = processing_class if isinstance(processing_class, PreTrainedTokenizerBase) else None
        try:
            self.recipe, self.task, self.adapted = describe_run(
                model, adapters, self.data, base_model=self.base_model, tokenizer=tokenizer, **self._recipe_keys(args)
            )
        except AfloraError as err:
            raise AfloraError(f"AfloraCallback: {err}") from None
        if state.global_step > 0:
            self._restore(args, state, model, optimizer)
        else:  # a resumed run keeps the schedule it was started on (checked in `_restore`)
            self._check_ramp(args, total, per_epoch)
        self._catch_stop_signals()

    def _check_ramp(self, args: TrainingArguments, total: int, per_epoch: int) -> None:
        """Adaptive PMs need a ramp of Eq. 5 to freeze on: refused in one line, in the Trainer's words, otherwise."""
        freezer = self.freezer
        if freezer is None or not freezer.num_units:
            return
        total_is = (
            "max_steps"
            if args.max_steps > 0
            else f"num_train_epochs = {args.num_train_epochs:g} x {per_epoch} steps per epoch"
        )
        try:
            check_ramp(self.config.freezing, freezer.t_i, freezer.t_f, total, total_is=total_is, key="freezing")
        except AfloraError as err:
            raise AfloraError(f"AfloraCallback: {err}") from None

    # ---- stopping on a signal ----------------------------------------------------------------------
    def _catch_stop_signals(self) -> None:
        """SIGTERM, SIGINT and SIGUSR1 stop training after the current step (main thread only)."""
        self.stopped_by = None
        try:
            for signum in STOP_SIGNALS:
                self._previous_handlers.setdefault(signum, signal.signal(signum, self._on_stop_signal))
        except ValueError:  # not the main thread: signals keep their handlers
            pass

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        if self.stopped_by is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once
        self.stopped_by = self.stopped_by or signum

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Every rank asks whether any rank got a stop signal, so all save and stop at the same step."""
        flag = self.stopped_by or 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            device = args.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
            box = torch.tensor([flag], dtype=torch.int64, device=device)
            torch.distributed.all_reduce(box, op=torch.distributed.ReduceOp.MAX)
            flag = int(box.item())
        if flag:
            self.stopped_by = flag
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._previous_handlers = {}

    @property
    def freezer(self) -> Freezer | None:
        """The freezer of the model this callback drives (None before training begins)."""
        return self.adapters.freezer if self.adapters is not None else None

    def _recipe_keys(self, args: TrainingArguments) -> dict[str, Any]:
        """The TrainingArguments in a recipe's terms, for the manifest (and `aflora eval`'s token limit)."""
        layout = self.adapters.layout if self.adapters is not None else None
        total = layout.total_steps if layout is not None else 0
        max_length = self.max_length or getattr(args, "max_length", None)
        training: dict[str, Any] = {
            "epochs": args.num_train_epochs,
            "max_steps": args.max_steps if args.max_steps > 0 else None,
            "batch_size": args.per_device_train_batch_size,
            "eval_batch_size": args.per_device_eval_batch_size,
            "gradient_accumulation": args.gradient_accumulation_steps,
            "lr": args.learning_rate,
            "weight_decay": args.weight_decay,
            "warmup_ratio": args.get_warmup_steps(total) / max(total, 1),
            "max_grad_norm": args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None,
            "gradient_checkpointing": bool(args.gradient_checkpointing),
            **({"max_length": max_length} if max_length else {}),
        }
        return {
            "output_dir": str(args.output_dir),
            "seed": args.seed,
            "device": "cpu" if args.use_cpu else "auto",
            "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
            "training": training,
        }

    def _claim(self, model: nn.Module, state: TrainerState) -> Adapters:
        """The model's adapters, made with this callback's settings and driven by no other callback."""
        adapters = adapters_of(model, "AfloraCallback")
        if adapters.config != self.config:
            key = differing_key(adapters.config.model_dump(mode="json"), self.config.model_dump(mode="json"))
            raise AfloraError(
                f"AfloraCallback: the model's adapters were added with other settings than the callback's "
                f"(they differ at {key}); give add_adapters and AfloraCallback the same config"
            )
        if adapters.owner is not None and adapters.owner[1] is state and adapters.owner[0] is not self:
            raise AfloraError("AfloraCallback: the Trainer has two AfloraCallbacks; pass exactly one")
        adapters.owner = (self, state)
        return adapters

    def _restore(
        self, args: TrainingArguments, state: TrainerState, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> None:
        """Resuming at step N: the freezer as it was in <output_dir>/checkpoint-N, frozen PMs frozen again."""
        assert self.freezer is not None and self.adapters is not None
        folder = Path(str(args.output_dir)) / f"{CHECKPOINT_PREFIX}{state.global_step}"
        file = folder / FREEZER_FILE
        if not file.is_file():
            raise AfloraError(
                f"AfloraCallback: resuming at step {state.global_step}, but {file} is missing; resume from a "
                "checkpoint in the Trainer's output_dir that AfloraCallback saved"
            )
        if (folder / MANIFEST_FILE).is_file():
            verify_checksums(folder, read_manifest(folder))
        saved = read_state(file)
        schedule = saved.get(SCHEDULE_KEY) or _manifest_schedule(folder)
        self._continue_auto(schedule, model)
        self._check_schedule(schedule, folder)
        try:
            self.freezer.load_state_dict(saved)
        except ValueError as err:
            raise AfloraError(f"{file}: {err}") from None
        frozen = [self.freezer.matrices[name] for name, step in self.freezer.freeze_log.items() if step is not None]
        release_optimizer_state(optimizer, frozen)

    def _continue_auto(self, saved: dict[str, Any] | None, model: nn.Module) -> None:
        """t_i and t_f left `auto` continue the checkpoint's schedule when T is the same: a run saved before `auto`
        existed (on the old defaults, 1 epoch and 70 %) then resumes on the very schedule it started with."""
        cfg, layout = self.config.freezing, self.adapters.layout if self.adapters is not None else None
        if saved is None or layout is None or AUTO not in (cfg.t_i, cfg.t_f):
            return
        if saved.get("total_steps") != layout.total_steps:
            return  # another T: `_check_schedule` refuses it
        t_i = saved.get("t_i") if cfg.t_i == AUTO else layout.t_i
        t_f = saved.get("t_f") if cfg.t_f == AUTO else layout.t_f
        if isinstance(t_i, int) and isinstance(t_f, int) and (t_i, t_f) != (layout.t_i, layout.t_f):
            assert self.adapters is not None
            self.adapters.start_freezing(
                model, total_steps=layout.total_steps, steps_per_epoch=layout.steps_per_epoch, steps=(t_i, t_f)
            )

    def _schedule(self) -> dict[str, int]:
        """The schedule the freezer is laid out for: T, t_i and t_f in optimizer steps."""
        assert self.freezer is not None
        return {"total_steps": self.freezer.total_steps, "t_i": self.freezer.t_i, "t_f": self.freezer.t_f}

    def _check_schedule(self, saved: dict[str, Any] | None, folder: Path) -> None:
        """The freeze log being continued must have been laid out for the same T, t_i and t_f: with another step
        count its PMs froze on another ramp, and the log would follow Eq. 5 for neither schedule."""
        now = self._schedule()
        if saved is None or all(saved.get(key) == value for key, value in now.items()):
            return  # a checkpoint of an older version saved no schedule: nothing to compare with
        raise AfloraError(
            f"AfloraCallback: {folder} froze its PMs on a schedule of T = {saved.get('total_steps')} steps "
            f"(t_i = {saved.get('t_i')}, t_f = {saved.get('t_f')}), but this run has T = {now['total_steps']} "
            f"(t_i = {now['t_i']}, t_f = {now['t_f']}); resume with the run's max_steps / num_train_epochs "
            "(and batch settings), or start a new run from the base model"
        )

    # ---- every optimizer step -----------------------------------------------------------------------
    def on_pre_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        """Score on this step's final gradients, then freeze what Eq. 5 asks for before the optimizer steps."""
        freezer = self.freezer
        if freezer is None or optimizer is None:
            raise AfloraError("AfloraCallback: on_pre_optimizer_step before on_train_begin")
        step = state.global_step
        if freezer.gradients_finite():
            freezer.update_scores(step)
        newly = freezer.apply_schedule(step)
        if newly:
            release_optimizer_state(optimizer, newly)

    # ---- checkpoints --------------------------------------------------------------------------------
    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """The adapter checkpoint, into the folder the Trainer has just written."""
        adapters, freezer = self.adapters, self.freezer
        if not args.should_save or adapters is None or freezer is None or model is None:
            return
        folder = Path(str(args.output_dir)) / f"{CHECKPOINT_PREFIX}{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        manifest = adapter_manifest(adapters, self.recipe, self.task, self.adapted, state.global_step)

        def save_freezer(into: Path) -> None:
            partial = into / f".{FREEZER_FILE}.tmp"
            torch.save({**freezer.state_dict(), SCHEDULE_KEY: self._schedule()}, partial)
            fsync_path(partial)
            partial.replace(into / FREEZER_FILE)
            write_card(into, manifest)

        write_checkpoint_files(folder, model, self.adapted.head_names, manifest, extra=save_freezer)


def _refuse_fsdp(args: TrainingArguments) -> None:
    """The Trainer's FSDP (its `fsdp` argument, or `accelerate launch` with an FSDP config) shards the PMs with the
    base: each rank would hold a slice of every PM's gradient and score only that slice. Refused in one line."""
    if getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        raise AfloraError(
            "AfloraCallback: the Trainer's FSDP (the fsdp argument, or accelerate's FSDP plugin) is not supported: it "
            "shards the PMs, and each rank would score only its slice of them; train under DDP (no fsdp argument, "
            "no FSDP config for accelerate launch), or shard the base with `aflora train` and training.fsdp"
        )


def _manifest_schedule(folder: Path) -> dict[str, Any] | None:
    """The schedule a checkpoint's manifest records (for freezer files saved before they held it), or None."""
    if not (folder / MANIFEST_FILE).is_file():
        return None
    freezing = read_manifest(folder).get("freezing")
    return freezing if isinstance(freezing, dict) else None
