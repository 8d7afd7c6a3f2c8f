"""An adapted model for a task: built fresh from a recipe, or rebuilt from a checkpoint directory."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from aflora_cli.data import TaskSpec
from aflora_cli.engine import base_model
from aflora_cli.engine.checkpoint import load_weights_into, read_weights
from aflora_cli.engine.inject import Target, inject_adapters, unfreeze_head
from aflora_cli.errors import AfloraError
from aflora_cli.inspection import read_checkpoint_manifest
from aflora_cli.recipe import Recipe, parse_recipe


@dataclass
class AdaptedModel:
    """The model with adapters and head, and what is needed to describe it in a checkpoint."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    targets: list[Target]
    head_names: list[str]
    model_dir: Path
    fingerprint: str


def load_base(recipe: Recipe, base_dir: Path | None = None) -> tuple[Path, PreTrainedTokenizerBase]:
    """The base model's local directory and tokenizer, before the task is known."""
    model_dir = base_dir or base_model.resolve_model_dir(recipe.model.name_or_path, recipe.model.revision)
    return model_dir, base_model.load_tokenizer(model_dir)


def build_adapted(recipe: Recipe, spec: TaskSpec, model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> AdaptedModel:
    """Base model + task head + adapters on every target, PMs set per the recipe's policy."""
    model = base_model.load_classifier(
        model_dir, spec.num_labels, spec.problem, list(spec.label_names or []), tokenizer.pad_token_id
    )
    targets = inject_adapters(model, recipe.adapter)
    head_names = unfreeze_head(model)
    return AdaptedModel(model, tokenizer, targets, head_names, model_dir, base_model.fingerprint(model_dir))


def describe(adapted: AdaptedModel, recipe: Recipe, spec: TaskSpec) -> dict[str, Any]:
    """The manifest entries that say what model this is: base, task, method, targets, recipe."""
    scaling = adapted.model.get_submodule(adapted.targets[0].name).scaling
    return {
        "base_model": {
            "name_or_path": recipe.model.name_or_path,
            "revision": recipe.model.revision,
            "fingerprint": adapted.fingerprint,
        },
        "task": spec.to_dict(),
        "method": recipe.adapter.method,
        "rank": recipe.adapter.rank,
        "scaling": scaling,
        "targets": [asdict(target) for target in adapted.targets],
        "head": adapted.head_names,
        "recipe": recipe.model_dump(mode="json"),
    }


def load_checkpoint(
    path: Path, base: str | None = None, manifest: dict[str, Any] | None = None
) -> tuple[AdaptedModel, dict[str, Any], Recipe, TaskSpec]:
    """Rebuild base + adapters + head from a checkpoint; `base` points at the base model if it moved.

    `manifest` is the checkpoint's, already read by `read_checkpoint_manifest`; it is read when not given.
    """
    path = Path(path)
    manifest = manifest if manifest is not None else read_checkpoint_manifest(path)
    tensors = read_weights(path)
    recipe = parse_recipe(manifest.get("recipe"), f"{path}/adapter_config.json (recipe)")
    try:
        spec = TaskSpec.from_dict(manifest["task"])
    except (KeyError, TypeError) as err:
        raise AfloraError(f"{path}/adapter_config.json: task: damaged entry ({err})") from None
    if base is not None:
        recipe.model.name_or_path = base
    model_dir, tokenizer = load_base(recipe)
    found = base_model.fingerprint(model_dir)
    expected = manifest["base_model"]["fingerprint"]
    if found != expected:
        raise AfloraError(
            f"{path}: base model {model_dir} has fingerprint {found[:19]}…, the checkpoint was trained on "
            f"{expected[:19]}… ({manifest['base_model']['name_or_path']}); pass --base with the right model"
        )
    adapted = build_adapted(recipe, spec, model_dir, tokenizer)
    load_weights_into(adapted.model, tensors, adapted.head_names, path)
    params = dict(adapted.model.named_parameters())
    for name, step in manifest.get("freeze_log", {}).items():
        if step is not None:
            params[name].requires_grad_(False)
    return adapted, manifest, recipe, spec
