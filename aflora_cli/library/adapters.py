"""aflora from Python: add adapters to a transformers model you built, freeze them on the paper's schedule in
your own loop (or with `AfloraCallback` in the Hugging Face Trainer), save checkpoints that `aflora inspect`,
`merge` and `eval` read, and fold the adapters back into the weights.

It is the engine `aflora train` runs — injection, the Eq. 1 layer, the freezer of Eqs. 2-5, the checkpoint
writer — behind a few functions; the settings are the recipe's own `adapter` and `freezing` sections.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn
from transformers import PreTrainedTokenizerBase

from aflora_cli.adapted.building import AdaptedModel, RunLayout, run_manifest
from aflora_cli.adapted.loading import load_checkpoint as read_back
from aflora_cli.adapted.model_card import checkpoint_card
from aflora_cli.engine import base_model as base_model_files
from aflora_cli.engine.checkpoint import save_checkpoint
from aflora_cli.engine.config import AdapterConfig, FreezingConfig, resolve_schedule
from aflora_cli.engine.freezing import Freezer
from aflora_cli.engine.inject import Target, adaptive_matrices, fold_adapters, inject_adapters, unfreeze_head
from aflora_cli.engine.params import count_trainable
from aflora_cli.engine.storage import storage_of
from aflora_cli.errors import AfloraError
from aflora_cli.recipe import DataConfig, Recipe, parse_recipe
from aflora_cli.tasks import Task, resolve_task

Model = TypeVar("Model", bound=BaseModel)
ATTRIBUTE = "aflora_adapters"  # where add_adapters leaves its record on the model


class AfloraConfig(BaseModel):
    """Which adapters to add and how they freeze: the `adapter` and `freezing` sections of a recipe, with the
    same keys and defaults (method aflora, r = 4, FFN PMs adaptive, attention PMs frozen; t_i and t_f auto: the
    paper's 1 epoch and 70 % where they leave a ramp, else 20 % and 40 %).

    `AfloraConfig(adapter={"rank": 8}, freezing={"t_i": "20%", "t_f": "40%"})`
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    adapter: AdapterConfig = AdapterConfig()
    freezing: FreezingConfig = FreezingConfig()


def validated(cls: type[Model], value: Model | dict[str, Any] | None, where: str) -> Model:
    """A settings model from itself, a dict of its keys, or None (its defaults); a bad key is one line."""
    if isinstance(value, cls):
        return value
    try:
        return cls.model_validate(value or {})
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        raise AfloraError(f"{where}: {key + ': ' if key else ''}{first['msg']}") from None


def as_config(config: AfloraConfig | dict[str, Any] | None, where: str = "config") -> AfloraConfig:
    """An AfloraConfig from itself, a dict of its sections, or None (the defaults)."""
    return validated(AfloraConfig, config, where)


@dataclass
class Adapters:
    """What `add_adapters` put into a model; kept on the model as `model.aflora_adapters`."""

    config: AfloraConfig
    targets: list[Target]
    head_names: list[str]  # the task head's parameters, trained in full (empty for language models)
    start_counts: tuple[int, int]  # trainable parameters before any PM froze: without the head, with it
    freezer: Freezer | None = None  # built by `start_freezing`
    layout: RunLayout | None = None
    owner: Any = None  # (callback, the Trainer's state) of the AfloraCallback that drives this model's freezing

    def start_freezing(
        self, model: nn.Module, *, total_steps: int, steps_per_epoch: int, steps: tuple[int, int] | None = None
    ) -> Freezer:
        """The freezer of this model's adaptive PMs, its schedule laid over `total_steps` optimizer steps
        (`steps_per_epoch` turns t_i / t_f given in epochs into steps; `steps`, if given, are t_i and t_f in
        steps instead of the config's); kept here for `save_adapters`.

        In your own loop, after `backward()` (and any clipping) and before `optimizer.step()` of step t = 0, 1, …:
        `freezer.update_scores(t)`, then `frozen = freezer.apply_schedule(t)` and
        `release_from_optimizer(optimizer, frozen)`.
        """
        cfg = self.config.freezing
        t_i, t_f = steps or resolve_schedule(cfg, steps_per_epoch, total_steps)
        matrices = adaptive_matrices(model, self.targets)
        self.freezer = Freezer.from_config(matrices, cfg, total_steps=total_steps, t_i=t_i, t_f=t_f)
        self.layout = RunLayout(total_steps, steps_per_epoch, t_i, t_f)
        return self.freezer


def add_adapters(model: nn.Module, config: AfloraConfig | dict[str, Any] | None = None) -> Adapters:
    """Freeze `model`, put an adapter beside every targeted linear layer and make the task head trainable.

    The head is every parameter outside the backbone (`base_model_prefix`) of a model that does not generate
    text — the classifier of `AutoModelForSequenceClassification`, as `aflora train` does; a language model's
    output layer stays frozen. Returns the record it also leaves on the model as `model.aflora_adapters`.
    """
    if adapters_on(model) is not None:
        raise AfloraError("add_adapters: this model already has aflora adapters; start again from the base model")
    settings = as_config(config)
    targets = inject_adapters(model, settings.adapter)
    generates = callable(getattr(model, "can_generate", None)) and bool(model.can_generate())  # type: ignore[operator]
    head_names = [] if generates else unfreeze_head(model)
    adapters = Adapters(settings, targets, head_names, count_trainable(model, head_names))
    setattr(model, ATTRIBUTE, adapters)
    return adapters


def adapters_of(model: nn.Module, who: str) -> Adapters:
    """The record `add_adapters` left on `model`; one clear error naming `who` asked if there is none."""
    found = adapters_on(model)
    if found is None:
        raise AfloraError(f"{who}: the model has no aflora adapters; call aflora_cli.add_adapters(model, config) first")
    return found


def adapters_on(model: nn.Module) -> Adapters | None:
    """The record `add_adapters` left on `model`, or None."""
    found = getattr(model, ATTRIBUTE, None)
    return found if isinstance(found, Adapters) else None


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain layer back: a model that no longer needs
    aflora (`save_pretrained` it as usual). Works in place; returns the model."""
    adapters_of(model, "merge_adapters")
    fold_adapters(model)
    delattr(model, ATTRIBUTE)
    return model


def describe_run(
    model: nn.Module,
    adapters: Adapters,
    data: DataConfig | dict[str, Any],
    *,
    base_model: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    **recipe_keys: Any,
) -> tuple[Recipe, Task, AdaptedModel]:
    """The run as a recipe — the settings a manifest records and `aflora eval` reads —, its task, and the
    adapted model with where its base lives.

    `data` holds a recipe's `data` keys; `recipe_keys` other top-level recipe keys (`output_dir`, `seed`,
    `training`, ...). `base_model` is a hub id or directory, by default the one the model was loaded from.
    """
    name = base_model or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        raise AfloraError("the model does not say where it was loaded from; pass base_model=")
    # the user loaded this model already: the files they chose to trust are trusted again when `aflora eval`
    # or `merge` rebuilds it
    model_dir, fingerprint = base_model_files.locate_model(str(name), allow_bin=True)
    trusted = {
        "allow_bin_weights": not any(model_dir.glob("*.safetensors")),
        "trust_remote_code": type(model).__module__.startswith("transformers_modules"),  # a class of the model's code
    }
    raw = {
        "output_dir": ".",
        "model": {"name_or_path": str(name), **storage_of(model).describe(), **trusted},
        "data": data.model_dump(mode="json", exclude_defaults=True) if isinstance(data, DataConfig) else data,
        **adapters.config.model_dump(mode="json"),
        **recipe_keys,
    }
    recipe = parse_recipe(raw, "the run's settings")
    task = resolve_task(recipe, getattr(model, "config", None))
    _check_family(model, task)
    if tokenizer is None:
        tokenizer = base_model_files.load_tokenizer(model_dir)
    adapted = AdaptedModel(model, tokenizer, adapters.targets, adapters.head_names, model_dir, fingerprint)
    return recipe, task, adapted


def _check_family(model: nn.Module, task: Task) -> None:
    """The model must be of the class the task's family loads: `aflora eval` and `merge` rebuild it so."""
    import transformers

    config = getattr(model, "config", None)
    auto = getattr(transformers, task.auto_class)
    try:
        expected = auto._model_mapping[type(config)]
    except KeyError:
        expected = None
    if type(model) is not expected:
        raise AfloraError(
            f"data task {task.name!r} trains a {task.family} model ({task.auto_class}), "
            f"but the model is a {type(model).__name__}"
        )
    labels, head = getattr(task.spec, "num_labels", None), getattr(config, "num_labels", None)
    if labels is not None and labels != head:
        raise AfloraError(f"data task {task.name!r} has {labels} labels, the model's head has {head}")


def adapter_manifest(
    adapters: Adapters, recipe: Recipe, task: Task, adapted: AdaptedModel, step: int
) -> dict[str, Any]:
    """The manifest of a checkpoint after `step` optimizer steps (no freezing started: nothing frozen)."""
    freezer, layout = adapters.freezer, adapters.layout
    if freezer is None or layout is None:
        layout = RunLayout(step, step, 0, 0)
        freezer = Freezer.from_config(
            adaptive_matrices(adapted.model, adapters.targets), adapters.config.freezing, total_steps=step, t_i=0, t_f=0
        )
    return run_manifest(adapted, recipe, task, freezer, layout, adapters.start_counts, step, None)


def save_adapters(
    model: nn.Module,
    path: str | Path,
    *,
    data: DataConfig | dict[str, Any],
    step: int = 0,
    base_model: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Path:
    """Write an aflora checkpoint of `model` to the folder `path` (replaced whole, atomically): the adapter and
    head weights in safetensors and a manifest with the freeze log, which `aflora inspect`, `merge`, `eval`
    and `load_checkpoint` read. `data` and `base_model` as in `describe_run`."""
    adapters = adapters_of(model, "save_adapters")
    recipe, task, adapted = describe_run(model, adapters, data, base_model=base_model, tokenizer=tokenizer)
    manifest = adapter_manifest(adapters, recipe, task, adapted, step)
    save_checkpoint(Path(path), model, adapters.head_names, manifest, extra=checkpoint_card(manifest))
    return Path(path)


def load_checkpoint(path: str | Path, base_model: str | None = None) -> AdaptedModel:
    """An aflora checkpoint (from `aflora train`, `AfloraCallback` or `save_adapters`) rebuilt: base model,
    adapters (PMs frozen as the log says) and head; `.model` and `.tokenizer` are ready to use, and
    `merge_adapters(.model)` folds it. `base_model` is the base model's directory if it moved."""
    loaded = read_back(Path(path), base_model)
    adapted, manifest, recipe = loaded.adapted, loaded.manifest, loaded.recipe
    counts = manifest.get("trainable_params") or {}
    start = (counts.get("start", 0), counts.get("start_with_head", 0))
    config = AfloraConfig(adapter=recipe.adapter, freezing=recipe.freezing)
    setattr(adapted.model, ATTRIBUTE, Adapters(config, adapted.targets, adapted.head_names, start))
    return adapted
