"""What a checkpoint says about itself: its manifest, checked entry by entry for what eval, merge and inspect
use. Kept apart from building the model (`loading`) so that reading a checkpoint needs neither torch nor
transformers: `aflora inspect` starts in a fraction of a second."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aflora_cli.engine.manifest import MANIFEST_FILE, MATRICES, WEIGHTS_FILE, read_manifest, verify_checksums
from aflora_cli.errors import AfloraError

_MISSING = object()


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
