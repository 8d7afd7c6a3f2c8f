"""Task families: the one seam between what is learned and the family-agnostic engine, trainer and commands.

A *family* decides the model class, how rows become tokens and labels, the loss, how a split is scored and
how a merged model is saved and loaded: sequence classification (`classification.py`), causal language
models (`causal_lm.py`) and encoder-decoders (`seq2seq.py`). The trainer, freezer, checkpoint, manifest and
CLI only talk to the `Task` interface below.

Classification tasks name labels to predict; text tasks (`text_data.py`) pair a prompt with a response, and
whether they train a causal LM or an encoder-decoder follows from the base model's config.
"""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from aflora_cli.engine.storage import BaseStorage
from aflora_cli.errors import AfloraError
from aflora_cli.recipe import Recipe

Row = dict[str, Any]
Progress = Callable[[int, int], None]  # (rows done, rows in all)


@dataclass
class TaskData:
    """A task's encoded splits: `train` (None when not asked for) and the eval splits by our split name.

    A split is a sequence of encoded rows (anything a DataLoader indexes); `skipped` counts the rows of each
    split left out because they could not be encoded within the length limits, and `why_skipped` says so in
    one line with the numbers (how many, how long, the limit that would keep them). `uncached` names the splits
    encoded but not written to the encoded-rows cache, with why (a full disk): the next run encodes them again.
    """

    train: Sequence[Row] | None
    evaluation: Mapping[str, Sequence[Row]]
    skipped: dict[str, int] = field(default_factory=dict)
    why_skipped: dict[str, str] = field(default_factory=dict)
    uncached: dict[str, str] = field(default_factory=dict)


@dataclass
class Prediction:
    """One scored row, as `aflora eval --predictions` writes it: `prompt` is the input as the model saw it
    (decoded after truncation); `source`, for text tasks, the whole input before truncation."""

    prompt: str
    output: str
    extracted: Any
    reference: Any
    correct: bool | None
    scores: dict[str, float] = field(default_factory=dict)
    source: str | None = None

    def value(self, metric: str) -> float | None:
        """This row's share of a metric that is a mean over rows (ROUGE, accuracy, exact match), else None."""
        if metric in self.scores:
            return self.scores[metric]
        return float(self.correct) if metric == "accuracy" and self.correct is not None else None


def paired_gain(before: Sequence[Prediction], after: Sequence[Prediction], metric: str) -> tuple[float, float] | None:
    """Mean per-row change of `metric` between two evaluations of the same rows, with the half-width of its
    95 % interval (normal approximation); None when the metric is not a mean over rows."""
    if len(before) != len(after):
        return None
    pairs = [(a.value(metric), b.value(metric)) for a, b in zip(before, after, strict=True)]
    if len(pairs) < 2 or any(a is None or b is None for a, b in pairs):
        return None
    differences = [b - a for a, b in pairs]  # type: ignore[operator]
    mean = sum(differences) / len(differences)
    variance = sum((d - mean) ** 2 for d in differences) / (len(differences) - 1)
    return mean, 1.96 * math.sqrt(variance / len(differences))


class Task(ABC):
    """What one family needs to train and score a task; built from a recipe, or from a checkpoint's manifest."""

    family: ClassVar[str]
    auto_class: ClassVar[str]  # the transformers Auto class the base and the merged model load with
    peft_task_type: ClassVar[str]

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe

    @classmethod
    @abstractmethod
    def from_recipe(cls, recipe: Recipe) -> Task:
        """The task a recipe's data section describes (may read the train file, e.g. to learn labels)."""

    @classmethod
    @abstractmethod
    def from_manifest(cls, entry: dict[str, Any], recipe: Recipe) -> Task:
        """The task as `describe` saved it; reads no data."""

    spec: Any  # the family's description of the task; it has `name` and `eval_splits`

    # ---- what the task is -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        name: str = self.spec.name
        return name

    @property
    @abstractmethod
    def main_metric(self) -> str:
        """The metric that picks the best checkpoint (higher is better)."""

    @property
    def eval_splits(self) -> Mapping[str, str]:
        """Our eval split names -> their names in the source; the first picks the best checkpoint."""
        splits: Mapping[str, str] = self.spec.eval_splits
        return splits

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The manifest's `task` entry (with `family`), from which `from_manifest` rebuilds the task."""

    # ---- model ------------------------------------------------------------------------------------
    @abstractmethod
    def load_model(
        self,
        model_dir: Path,
        tokenizer: PreTrainedTokenizerBase,
        storage: BaseStorage | None = None,
        device: torch.device | None = None,
    ) -> nn.Module:
        """The base model with whatever the family adds (a classification head), stored as `storage` says
        (default fp32; a quantized base is loaded onto `device`)."""

    def train_head(self, model: nn.Module) -> list[str]:
        """Make the family's new parameters trainable after adapters are injected; their names."""
        return []

    # ---- data -------------------------------------------------------------------------------------
    @abstractmethod
    def load_splits(self, tokenizer: PreTrainedTokenizerBase, splits: Sequence[str] | None = None) -> TaskData:
        """Encode the named splits (None: train and every eval split) with the recipe's limits."""

    @property
    def data_seed(self) -> int:
        """The seed that draws `max_train_samples` / `max_eval_samples` subsets: `data.seed`, else the run's."""
        seed = self.recipe.data.seed
        return self.recipe.seed if seed is None else seed

    @abstractmethod
    def load_file(self, path: str | Path, tokenizer: PreTrainedTokenizerBase) -> Sequence[Row]:
        """A local file in the task's layout, encoded as an eval split."""

    @abstractmethod
    def collate(self, tokenizer: PreTrainedTokenizerBase) -> Callable[[list[Row]], dict[str, torch.Tensor]]:
        """Turns encoded rows into a padded training batch that the model's forward takes (loss included)."""

    def packed_collate(self, tokenizer: PreTrainedTokenizerBase) -> Callable[[list[Row]], dict[str, torch.Tensor]]:
        """Like `collate`, with the rows packed end to end (`training.packing`); refused where it cannot work."""
        raise AfloraError(
            f"training.packing: only causal-LM text tasks can pack rows; this task trains a {self.family} model "
            f"({self.auto_class})"
        )

    def lengths(self, rows: Sequence[Row]) -> list[int]:
        """Token count of each encoded row, for batches grouped by length."""
        return [len(row["input_ids"]) for row in rows]

    # ---- scoring ----------------------------------------------------------------------------------
    def scoring_batches(self, rows: Sequence[Row]) -> list[list[int]]:
        """Row indices of each scoring batch of `eval_batch_size`: in split order, or longest first with
        `eval.sort_by_length` (callers put the results back in split order)."""
        order = list(range(len(rows)))
        if self.recipe.eval.sort_by_length:
            lengths = self.lengths(rows)
            order.sort(key=lambda index: -lengths[index])
        size = self.recipe.training.eval_batch_size
        return [order[start : start + size] for start in range(0, len(order), size)]

    @abstractmethod
    def evaluate(
        self,
        model: nn.Module,
        rows: Sequence[Row],
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
        progress: Progress | None = None,
    ) -> tuple[dict[str, float], list[Prediction]]:
        """The task's metrics on one encoded split, and the row-by-row predictions behind them."""

    def complete(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        prompt: str,
        device: torch.device,
        max_new_tokens: int | None = None,
    ) -> str:
        """The model's completion of a user's prompt, rendered as in training (for `aflora generate`)."""
        raise AfloraError(f"task {self.name!r} ({self.family}) does not generate text; generate needs a text task")


def family_of(task_name: str, data_format: str | None, model_config: Any) -> str:
    """The family of a recipe's task on a given base model."""
    from aflora_cli.tasks import text_data

    if not text_data.is_text_task(task_name, data_format):
        return "classification"
    return "seq2seq" if getattr(model_config, "is_encoder_decoder", False) else "causal_lm"


# family -> (module, class); imported on demand, as each family pulls in what only it needs
FAMILIES = {
    "classification": ("aflora_cli.tasks.classification", "ClassificationTask"),
    "causal_lm": ("aflora_cli.tasks.causal_lm", "CausalLMTask"),
    "seq2seq": ("aflora_cli.tasks.seq2seq", "Seq2SeqTask"),
}


def task_class(family: str) -> type[Task]:
    """The Task implementation of a family."""
    if family not in FAMILIES:
        raise AfloraError(f"unknown task family {family!r}; known: {', '.join(FAMILIES)}")
    module, name = FAMILIES[family]
    found: type[Task] = getattr(importlib.import_module(module), name)
    return found


def resolve_task(recipe: Recipe, model_config: Any) -> Task:
    """The task a recipe describes, in the family its base model implies."""
    return task_class(family_of(recipe.data.task, recipe.data.format, model_config)).from_recipe(recipe)


def task_from_manifest(entry: dict[str, Any], recipe: Recipe) -> Task:
    """The task a checkpoint was trained on; manifests written before families existed are classification."""
    return task_class(entry.get("family", "classification")).from_manifest(entry, recipe)
