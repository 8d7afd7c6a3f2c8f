"""An adapted model for a task, built from a recipe: base model (+ head) + adapters, and the manifest entries
that describe it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedTokenizerBase

from aflora_cli.engine import base_model
from aflora_cli.engine.freezing import Freezer
from aflora_cli.engine.inject import Target, inject_adapters
from aflora_cli.engine.params import trainable_timeline
from aflora_cli.recipe import Recipe
from aflora_cli.tasks import Task, resolve_task


@dataclass
class AdaptedModel:
    """The model with adapters (and head, if its family has one), and what describes it in a checkpoint."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    targets: list[Target]
    head_names: list[str]
    model_dir: Path
    fingerprint: str


@dataclass
class Base:
    """The base model before the task is known: where it is, its fingerprint, its tokenizer."""

    model_dir: Path
    fingerprint: str
    tokenizer: PreTrainedTokenizerBase
    trust_remote_code: bool = False

    def config(self) -> Any:
        return base_model.load_or_fail(
            lambda: AutoConfig.from_pretrained(self.model_dir, trust_remote_code=self.trust_remote_code),
            self.model_dir,
            "config",
        )


def load_base(recipe: Recipe) -> Base:
    """Locate the recipe's base model (converting a GGUF on first use) and load its tokenizer."""
    model = recipe.model
    model_dir, found = base_model.locate_model(
        model.name_or_path, model.revision, model.gguf_file, model.allow_bin_weights
    )
    tokenizer = base_model.load_tokenizer(model_dir, model.trust_remote_code)
    return Base(model_dir, found, tokenizer, model.trust_remote_code)


def task_for(recipe: Recipe, base: Base) -> Task:
    """The recipe's task in the family its base model implies (a text task on an encoder-decoder: seq2seq)."""
    return resolve_task(recipe, base.config())


def build_adapted(recipe: Recipe, task: Task, base: Base, device: torch.device | None = None) -> AdaptedModel:
    """Base model (+ task head) + adapters on every target, PMs set per the recipe's policy; the base stored as
    `recipe.model` says (a quantized base is loaded onto `device`, default the CPU)."""
    model = task.load_model(base.model_dir, base.tokenizer, recipe.model.storage(), device)
    targets = inject_adapters(model, recipe.adapter)
    head_names = task.train_head(model)
    return AdaptedModel(model, base.tokenizer, targets, head_names, base.model_dir, base.fingerprint)


def describe(adapted: AdaptedModel, recipe: Recipe, task: Task) -> dict[str, Any]:
    """The manifest entries that say what model this is: base, task, method, targets, recipe."""
    scaling = adapted.model.get_submodule(adapted.targets[0].name).scaling
    return {
        "base_model": {
            "name_or_path": recipe.model.name_or_path,
            "revision": recipe.model.revision,
            "gguf_file": recipe.model.gguf_file,
            "fingerprint": adapted.fingerprint,
            **recipe.model.storage().describe(),
        },
        "task": task.describe(),
        "method": recipe.adapter.method,
        "rank": recipe.adapter.rank,
        "scaling": scaling,
        "targets": [asdict(target) for target in adapted.targets],
        "head": adapted.head_names,
        "recipe": recipe.model_dump(mode="json"),
    }


@dataclass(frozen=True)
class RunLayout:
    """How a run's steps are laid out, as the manifest records it (all in optimizer steps)."""

    total_steps: int
    steps_per_epoch: int
    t_i: int
    t_f: int


def run_manifest(
    adapted: AdaptedModel,
    recipe: Recipe,
    task: Task,
    freezer: Freezer,
    layout: RunLayout,
    start_counts: tuple[int, int],
    step: int,
    metrics: dict[str, Any] | None,
) -> dict[str, Any]:
    """A checkpoint's manifest after `step` optimizer steps: what the model is, how it froze and when, the
    trainable-parameter timeline and the metrics of this step (if it was evaluated)."""
    freezing = recipe.freezing
    sizes = {name: param.numel() for name, param in freezer.matrices.items()}
    return {
        **describe(adapted, recipe, task),
        "freezing": {
            "beta1": freezing.beta1,
            "beta2": freezing.beta2,
            "score": freezing.score,
            "interval": freezing.interval,
            "granularity": freezing.granularity,
            "power": freezing.power,
            "t_i": layout.t_i,
            "t_f": layout.t_f,
            "total_steps": layout.total_steps,
            "steps_per_epoch": layout.steps_per_epoch,
        },
        "step": step,
        "freeze_log": freezer.freeze_log,
        "freeze_scores": freezer.freeze_score,
        "trainable_params": trainable_timeline(start_counts, freezer.freeze_log, sizes, step),
        "metrics": metrics,
    }
