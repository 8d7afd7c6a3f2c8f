"""`aflora eval`: rebuild a checkpoint's model and score it on a split of its task, or on a local file.

Everything comes from the checkpoint directory: the task, the data settings, `max_length` and the eval
batch size are the resolved recipe saved in its manifest, so the figure equals what training logged for
the same checkpoint and split. No recipe file is read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from aflora_cli.adapted import AdaptedModel, load_checkpoint
from aflora_cli.data import TaskSpec, load_eval_file, load_task_data
from aflora_cli.errors import AfloraError
from aflora_cli.evaluation import evaluate
from aflora_cli.inspection import read_checkpoint_manifest
from aflora_cli.recipe import Recipe


@dataclass
class Rebuilt:
    """A checkpoint's model rebuilt on the CPU, with what its manifest says about it."""

    adapted: AdaptedModel
    manifest: dict[str, Any]
    recipe: Recipe
    spec: TaskSpec
    base_name: str


def rebuild(path: str | Path, base: str | None = None, manifest: dict[str, Any] | None = None) -> Rebuilt:
    """Base model + adapters + head from checkpoint `path`; `base` is the base model's directory if it moved.

    `manifest` is the checkpoint's, already read by `read_checkpoint_manifest`; it is read when not given.
    """
    path = Path(path)
    manifest = manifest if manifest is not None else read_checkpoint_manifest(path)
    name = manifest["base_model"]["name_or_path"]
    if base is not None:
        folder = Path(base).expanduser()
        if not folder.is_dir():
            raise AfloraError(f"--base {base}: not a directory")
        if not (folder / "config.json").is_file():
            raise AfloraError(f"--base {base}: no config.json; expected a transformers model directory")
        base = str(folder.resolve())
    elif name.startswith(("/", ".", "~")) and not Path(name).expanduser().is_dir():
        raise AfloraError(
            f"{path}: its base model {name} is not there any more; pass --base with the model's directory"
        )
    adapted, manifest, recipe, spec = load_checkpoint(path, base, manifest)
    return Rebuilt(adapted, manifest, recipe, spec, base or name)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class EvalResult:
    """One evaluation of a checkpoint, as `aflora eval` prints it."""

    checkpoint: str
    task: str
    split: str | None
    data_file: str | None
    rows: int
    metrics: dict[str, float]
    main_metric: str
    step: int
    logged: dict[str, float] | None
    device: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_split(manifest: dict[str, Any], split: str) -> None:
    """`split` must be one the task has (checked from the manifest, before any model is loaded)."""
    available = ["train", *manifest["task"]["eval_splits"]]
    if split not in available:
        raise AfloraError(
            f"--split {split}: not a split of task {manifest['task']['name']!r}; available: {', '.join(available)}"
        )


def _split_dataset(rebuilt: Rebuilt, split: str) -> Dataset:
    """One of the task's splits, loaded and tokenized exactly as the trainer did."""
    recipe, spec = rebuilt.recipe, rebuilt.spec
    cfg, tokenizer, max_length = recipe.data, rebuilt.adapted.tokenizer, recipe.training.max_length
    if spec.name == "custom":
        # the manifest holds the task's spec, so only this split's file is read (not the train file)
        file = getattr(cfg, f"{split}_file")
        limit = cfg.max_train_samples if split == "train" else cfg.max_eval_samples
        return load_eval_file(spec, file, tokenizer, max_length, limit, recipe.seed)
    data = load_task_data(cfg, tokenizer, max_length, recipe.seed, splits=[split])
    return data.train if split == "train" else data.evaluation[split]


def evaluate_checkpoint(
    path: str | Path,
    split: str | None = None,
    data_file: str | Path | None = None,
    base: str | None = None,
    device: torch.device | None = None,
) -> EvalResult:
    """Score checkpoint `path` on `split` (default: the task's first eval split) or on a local `data_file`."""
    if split is not None and data_file is not None:
        raise AfloraError("--split and --data: give one or the other")
    manifest = read_checkpoint_manifest(path)
    if data_file is not None:
        name = str(data_file)
        if not Path(data_file).is_file():
            raise AfloraError(f"--data {data_file}: file not found")
    else:
        name = split or next(iter(manifest["task"]["eval_splits"]), None) or "train"
        _check_split(manifest, name)
    rebuilt = rebuild(path, base, manifest)
    spec, recipe = rebuilt.spec, rebuilt.recipe
    tokenizer = rebuilt.adapted.tokenizer
    if data_file is not None:
        dataset = load_eval_file(spec, data_file, tokenizer, recipe.training.max_length)
        logged = None
    else:
        dataset = _split_dataset(rebuilt, name)
        logged = (manifest.get("metrics") or {}).get(name)
    device = device or default_device()
    model = rebuilt.adapted.model.to(device)
    metrics = evaluate(model, {name: dataset}, spec, tokenizer, recipe.training.eval_batch_size, device)[name]
    return EvalResult(
        checkpoint=str(path),
        task=spec.name,
        split=None if data_file is not None else name,
        data_file=None if data_file is None else str(data_file),
        rows=len(dataset),
        metrics=metrics,
        main_metric=spec.main_metric,
        step=manifest["step"],
        logged=logged,
        device=str(device),
    )
