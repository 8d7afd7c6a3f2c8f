"""`aflora eval`: rebuild a checkpoint's model and score it on a split of its task, or on a local file.

Everything comes from the checkpoint directory: the task, the data settings, `max_length` and the eval
batch size are the resolved recipe saved in its manifest, so the figure equals what training logged for
the same checkpoint and split. No recipe file is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from aflora_cli.adapted import AdaptedModel, load_checkpoint
from aflora_cli.errors import AfloraError
from aflora_cli.inspection import read_checkpoint_manifest
from aflora_cli.recipe import Recipe
from aflora_cli.tasks import Prediction, Progress, Row, Task


@dataclass
class Rebuilt:
    """A checkpoint's model rebuilt on the CPU, with what its manifest says about it."""

    adapted: AdaptedModel
    manifest: dict[str, Any]
    recipe: Recipe
    task: Task
    base_name: str


def rebuild(path: str | Path, base: str | None = None, manifest: dict[str, Any] | None = None) -> Rebuilt:
    """Base model + adapters + head from checkpoint `path`; `base` is the base model's directory (or GGUF file)
    if it moved.

    `manifest` is the checkpoint's, already read by `read_checkpoint_manifest`; it is read when not given.
    """
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
    adapted, manifest, recipe, task = load_checkpoint(path, base, manifest)
    return Rebuilt(adapted, manifest, recipe, task, base or name)


GENERATING_FAMILIES = ("causal_lm", "seq2seq")


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
    predictions_file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_split(manifest: dict[str, Any], split: str) -> None:
    """`split` must be one the task has (checked from the manifest, before any model is loaded)."""
    available = ["train", *manifest["task"]["eval_splits"]]
    if split not in available:
        raise AfloraError(
            f"--split {split}: not a split of task {manifest['task']['name']!r}; available: {', '.join(available)}"
        )


def _check_predictions_file(path: Path) -> None:
    """The predictions file must be .jsonl in a writable folder (checked before any model is loaded)."""
    if path.suffix != ".jsonl":
        raise AfloraError(f"--predictions {path}: expected a .jsonl file name")
    if path.is_dir():
        raise AfloraError(f"--predictions {path}: is a directory")
    folder = path.expanduser().resolve().parent
    if not folder.is_dir():
        raise AfloraError(f"--predictions {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise AfloraError(f"--predictions {path}: folder {folder} is not writable")


def write_predictions(path: Path, predictions: list[Prediction]) -> None:
    """One JSON object per row, written to a temporary sibling and renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            for row in predictions:
                handle.write(json.dumps(asdict(row), ensure_ascii=False) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def evaluate_checkpoint(
    path: str | Path,
    split: str | None = None,
    data_file: str | Path | None = None,
    base: str | None = None,
    device: torch.device | None = None,
    predictions_file: str | Path | None = None,
    progress: Progress | None = None,
) -> EvalResult:
    """Score checkpoint `path` on `split` (default: the task's first eval split) or on a local `data_file`;
    with `predictions_file`, also write what the model predicted for every row."""
    if split is not None and data_file is not None:
        raise AfloraError("--split and --data: give one or the other")
    manifest = read_checkpoint_manifest(path)
    if predictions_file is not None:
        _check_predictions_file(Path(predictions_file))
    if data_file is not None:
        name = str(data_file)
        if not Path(data_file).is_file():
            raise AfloraError(f"--data {data_file}: file not found")
    else:
        name = split or next(iter(manifest["task"]["eval_splits"]), None) or "train"
        _check_split(manifest, name)
    rebuilt = rebuild(path, base, manifest)
    task, tokenizer = rebuilt.task, rebuilt.adapted.tokenizer
    rows: Sequence[Row] | None
    if data_file is not None:
        rows = task.load_file(data_file, tokenizer)
        logged = None
    else:
        data = task.load_splits(tokenizer, [name])
        rows = data.train if name == "train" else data.evaluation[name]
        assert rows is not None
        logged = (manifest.get("metrics") or {}).get(name)
    device = device or default_device()
    model = rebuilt.adapted.model.to(device)
    metrics, predictions = task.evaluate(model, rows, tokenizer, device, progress)
    if predictions_file is not None:
        write_predictions(Path(predictions_file), predictions)
    return EvalResult(
        checkpoint=str(path),
        task=task.name,
        split=None if data_file is not None else name,
        data_file=None if data_file is None else str(data_file),
        rows=len(rows),
        metrics=metrics,
        main_metric=task.main_metric,
        step=manifest["step"],
        logged=logged,
        device=str(device),
        predictions_file=None if predictions_file is None else str(predictions_file),
    )


def generate_text(
    path: str | Path,
    prompt: str,
    max_new_tokens: int | None = None,
    base: str | None = None,
    device: torch.device | None = None,
) -> str:
    """The checkpoint's completion of `prompt`, rendered as in training (template, chat template)."""
    manifest = read_checkpoint_manifest(path)
    family = manifest["task"].get("family", "classification")
    if family not in GENERATING_FAMILIES:
        raise AfloraError(
            f"{path}: a {family} checkpoint (task {manifest['task']['name']!r}) does not generate text; "
            "generate needs a causal-LM or seq2seq checkpoint"
        )
    rebuilt = rebuild(path, base, manifest)
    device = device or default_device()
    model = rebuilt.adapted.model.to(device)
    return rebuilt.task.complete(model, rebuilt.adapted.tokenizer, prompt, device, max_new_tokens)
