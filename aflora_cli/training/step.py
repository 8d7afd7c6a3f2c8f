"""One optimizer step of a training run, apart from data, evaluation and files.

The optimizer, its learning-rate schedule and `TrainingStep` are what `Trainer` runs at every step, and
what the speed benchmark times on its own batches: forward and backward over the step's micro-batches
(DDP reduces the gradients on the last), then the freezer between those final gradients and AdamW.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any, Literal, cast

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR

from aflora_cli.engine.freezing import Freezer, release_from_optimizer
from aflora_cli.recipe import TrainingConfig
from aflora_cli.training.distributed import ProcessGroup
from aflora_cli.training.sharding import average_gradients


def build_optimizer(model: torch.nn.Module, head_names: Sequence[str], cfg: TrainingConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters in model order; the head may have its own learning rate."""
    head = set(head_names)
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {
        (is_head, decay): [] for is_head in (False, True) for decay in (True, False)
    }
    for name, param in model.named_parameters():
        if param.requires_grad:
            decay = not (name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name)
            groups[(name in head, decay)].append(param)
    return torch.optim.AdamW(
        [
            {
                "params": params,
                "lr": (cfg.head_lr or cfg.lr) if is_head else cfg.lr,
                "weight_decay": cfg.weight_decay if decay else 0.0,
            }
            for (is_head, decay), params in groups.items()
        ]
    )


def _linear_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate factor at `step`: a linear rise over the warmup, then a linear fall to 0 at T."""
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Linear warmup and decay, the same arithmetic as transformers' `get_linear_schedule_with_warmup`.

    Written here because importing that function imports `transformers.trainer_utils`, which imports peft
    when it is installed: about a second of every `aflora train` start-up, for five lines.
    """
    return LambdaLR(optimizer, functools.partial(_linear_factor, warmup_steps=warmup_steps, total_steps=total_steps))


class TrainingStep:
    """Forward, backward and the optimizer step of one model, its freezer and its optimizer.

    `step` counts the optimizer steps taken; frozen PMs leave the optimizer and, under DDP, the model is
    wrapped again so DDP tracks only what still trains. A `sharded` model (FSDP, `training/sharding.py`) is
    wrapped already: its trainable parameters are whole on every rank, and their gradients are averaged here.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        freezer: Freezer,
        optimizer: torch.optim.Optimizer,
        scheduler: LambdaLR,
        scaler: torch.amp.GradScaler,
        group: ProcessGroup,
        precision: Literal["fp32", "bf16", "fp16"] = "fp32",
        max_grad_norm: float | None = None,
        frozen_numel: int = 0,
        sharded: bool = False,
    ) -> None:
        self.model, self.freezer, self.optimizer, self.scheduler, self.scaler = (
            model,
            freezer,
            optimizer,
            scheduler,
            scaler,
        )
        self.group, self.precision, self.max_grad_norm = group, precision, max_grad_norm
        self.frozen_numel = frozen_numel  # parameters of the PMs frozen so far
        self.sharded = sharded
        self.wrap()

    def wrap(self) -> None:
        """(Re)wrap the model in DDP; done again whenever PMs freeze so DDP tracks the right parameters."""
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        if self.group.distributed and not self.sharded:
            ids = [self.group.device.index] if self.group.device.type == "cuda" else None
            self.forward_model: torch.nn.Module = DistributedDataParallel(self.model, device_ids=ids)
        else:
            self.forward_model = self.model

    def autocast(self) -> Any:
        """The autocast context of the run's `precision` (none for fp32)."""
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.group.device.type, dtype=dtype)

    def forward_backward(self, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Accumulate gradients over the step's micro-batches; DDP reduces them on the last one (a sharded model's
        trainable gradients are averaged after it)."""
        total = torch.zeros((), device=self.group.device)
        for i, batch in enumerate(micro_batches):
            batch = {key: value.to(self.group.device) for key, value in batch.items()}
            last = i == len(micro_batches) - 1
            sync = (
                cast(DistributedDataParallel, self.forward_model).no_sync()
                if self.group.distributed and not self.sharded and not last
                else nullcontext()
            )
            with sync:
                with self.autocast():
                    loss = self.forward_model(**batch).loss.float() / len(micro_batches)
                self.scaler.scale(loss).backward()
            total += loss.detach()
        if self.sharded:
            average_gradients(self.trainable, self.group.world_size)
        if self.group.distributed:
            torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.AVG)
        return total

    def optimizer_step(self, loss: torch.Tensor, step: int) -> dict[str, Any]:
        """Check, score, freeze, clip and step (optimizer step `step`, 0-based): the freezer sees the final,
        reduced gradients."""
        self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.trainable if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        finite = bool(torch.isfinite(norm) & torch.isfinite(loss))
        if finite:
            self.freezer.update_scores(step)
        newly = self.freezer.apply_schedule(step)
        if newly:
            release_from_optimizer(self.optimizer, newly)
            self.frozen_numel += sum(p.numel() for p in newly)
            self.wrap()
        if finite:
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(self.trainable, self.max_grad_norm, norm)
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return {"finite": finite, "grad_norm": float(norm), "lr": lr, "newly_frozen": len(newly)}
