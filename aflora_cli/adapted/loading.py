"""Reading a checkpoint back: its manifest checked, then task, base model, adapters and head rebuilt.

The one place that turns a checkpoint directory into a model: `aflora eval`, `generate`, `merge` and
`inspect` (which reads the manifest only) and the Python API's `load_checkpoint` all go through here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aflora_cli.adapted.building import AdaptedModel, Base, build_adapted, load_base
from aflora_cli.engine.checkpoint import load_weights_into, read_weights
from aflora_cli.engine.manifest import MANIFEST_FILE, MATRICES, WEIGHTS_FILE, read_manifest, verify_checksums
from aflora_cli.errors import AfloraError
from aflora_cli.recipe import Recipe, parse_recipe
from aflora_cli.tasks import Task, task_from_manifest

_MISSING = object()


@dataclass
class LoadedCheckpoint:
    """A checkpoint's model rebuilt on the CPU, with what its manifest says about it."""

    adapted: AdaptedModel
    manifest: dict[str, Any]
    recipe: Recipe
    task: Task
    base_name: str  # the base model as loaded: the manifest's, or the `base` given instead


def entry(manifest: dict[str, Any], key: str, types: type | tuple[type, ...], path: Path) -> Any:
    """`manifest[a][b]` for key "a.b", or one clear error naming the file and the key."""
    value: Any = manifest
    for part in key.split("."):
        value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
    if value is _MISSING or not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
        what = "missing" if value is _MISSING else f"damaged ({type(value).__name__})"
        raise AfloraError(f"{path / MANIFEST_FILE}: entry {key!r} is {what}")
    return value


def _tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def read_checkpoint_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of checkpoint `path`, checked for every entry eval, merge and inspect use."""
    path = Path(path)
    manifest = read_manifest(path)
    if not (path / WEIGHTS_FILE).is_file():
        raise AfloraError(f"{path}: not a complete checkpoint ({WEIGHTS_FILE} is missing)")
    verify_checksums(path, manifest)
    for key, types in (
        ("base_model.name_or_path", str),
        ("base_model.fingerprint", str),
        ("task.name", str),
        ("task.main_metric", str),
        ("task.eval_splits", dict),
        ("method", str),
        ("rank", int),
        ("scaling", (int, float)),
        ("targets", list),
        ("head", list),
        ("recipe", dict),
        ("freezing.total_steps", int),
        ("freezing.steps_per_epoch", int),
        ("freezing.t_i", int),
        ("freezing.t_f", int),
        ("step", int),
        ("freeze_log", dict),
        ("freeze_scores", dict),
        ("trainable_params.by_step", list),
        ("trainable_params.average", (int, float)),
    ):
        entry(manifest, key, types, path)
    if manifest.get("metrics") is not None and not isinstance(manifest["metrics"], dict):
        raise AfloraError(f"{path / MANIFEST_FILE}: entry 'metrics' is damaged")
    names: set[str] = set()
    for target in manifest["targets"]:
        if not (isinstance(target, dict) and all(isinstance(target.get(k), str) for k in ("name", "kind", "policy"))):
            raise AfloraError(f"{path / MANIFEST_FILE}: entry 'targets' is damaged ({target!r})")
        names.update(f"{target['name']}.{matrix}" for matrix in MATRICES)
    for name, step in manifest["freeze_log"].items():
        if name not in names or not (step is None or isinstance(step, int)):
            raise AfloraError(f"{path / MANIFEST_FILE}: entry 'freeze_log' is damaged (at {name!r})")
    return manifest


@dataclass
class OpenedCheckpoint:
    """A checkpoint with everything but its model: manifest, recipe, task, adapter weights and the base model
    located (fingerprint checked, tokenizer loaded). Enough to read and check data before `load()` builds the
    model, the expensive part."""

    path: Path
    manifest: dict[str, Any]
    recipe: Recipe
    task: Task
    base: Base
    base_name: str
    tensors: dict[str, torch.Tensor]
    device: torch.device

    def load(self) -> LoadedCheckpoint:
        """Base model + adapters (PMs frozen as the freeze log says) + head, on the CPU (a quantized base
        directly on the device it was opened for)."""
        adapted = build_adapted(self.recipe, self.task, self.base, self.device)
        load_weights_into(adapted.model, self.tensors, adapted.head_names, self.path)
        params = dict(adapted.model.named_parameters())
        for name, step in self.manifest.get("freeze_log", {}).items():
            if step is not None:
                params[name].requires_grad_(False)
        return LoadedCheckpoint(adapted, self.manifest, self.recipe, self.task, self.base_name)


def load_checkpoint(
    path: str | Path,
    base: str | None = None,
    manifest: dict[str, Any] | None = None,
    device: torch.device | None = None,
) -> LoadedCheckpoint:
    """Base model + adapters (PMs frozen as the freeze log says) + head from checkpoint `path`, on the CPU (a
    quantized base directly on `device`), its base stored as in training.

    `base` is the base model's directory (or GGUF file) if it moved; a base with another fingerprint than the
    one the checkpoint was trained on is refused. `manifest` is the checkpoint's, already read by
    `read_checkpoint_manifest`; it is read when not given.
    """
    return open_checkpoint(path, base, manifest, device).load()


def open_checkpoint(
    path: str | Path,
    base: str | None = None,
    manifest: dict[str, Any] | None = None,
    device: torch.device | None = None,
) -> OpenedCheckpoint:
    """Checkpoint `path` checked and its base model located, without building the model (`load()` does);
    arguments as for `load_checkpoint`."""
    path = Path(path)
    manifest = manifest if manifest is not None else read_checkpoint_manifest(path)
    name = manifest["base_model"]["name_or_path"]
    if base is not None:
        location = Path(base).expanduser()
        if base.endswith(".gguf"):
            if not location.is_file():
                raise AfloraError(f"--base {base}: GGUF file not found")
        elif not location.is_dir():
            raise AfloraError(f"--base {base}: not a directory")
        elif not (location / "config.json").is_file():
            raise AfloraError(f"--base {base}: no config.json; expected a transformers model directory")
        base = str(location.resolve())
    elif name.startswith(("/", ".", "~")) and not Path(name).expanduser().exists():
        raise AfloraError(
            f"{path}: its base model {name} is not there any more; pass --base with the model's directory"
        )
    return _open(path, base, manifest, base or name, device or torch.device("cpu"))


def _open(
    path: Path, base: str | None, manifest: dict[str, Any], base_name: str, device: torch.device
) -> OpenedCheckpoint:
    """The parts of a checked manifest: recipe and task from the manifest, the saved weights, the base (checked
    by fingerprint and by whether its storage can run on `device`)."""
    tensors = read_weights(path)
    recipe = parse_recipe(manifest.get("recipe"), f"{path}/adapter_config.json (recipe)")
    try:
        task = task_from_manifest(manifest["task"], recipe)
    except (KeyError, TypeError) as err:
        raise AfloraError(f"{path}/adapter_config.json: task: damaged entry ({err})") from None
    if base is not None:
        recipe.model.name_or_path = base
        if base.endswith(".gguf"):
            recipe.model.gguf_file = None
    try:  # the base is loaded as in training: say which checkpoint asks for what cannot run here
        recipe.model.storage().check(device)
    except AfloraError as err:
        raise AfloraError(f"{path}: its base was trained stored this way — {err}") from None
    found = load_base(recipe)
    expected = manifest["base_model"]["fingerprint"]
    if found.fingerprint != expected:
        raise AfloraError(
            f"{path}: base model {found.model_dir} has fingerprint {found.fingerprint[:19]}…, the checkpoint was "
            f"trained on {expected[:19]}… ({manifest['base_model']['name_or_path']}); pass --base with the right model"
        )
    return OpenedCheckpoint(path, manifest, recipe, task, found, base_name, tensors, device)
