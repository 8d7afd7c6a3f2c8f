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

from aflora_cli.adapted.loading import load_checkpoint, open_checkpoint
from aflora_cli.adapted.reading import read_checkpoint_manifest
from aflora_cli.engine.storage import place
from aflora_cli.errors import AfloraError
from aflora_cli.tasks import Prediction, Progress, Row

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
                record = asdict(row)
                source = record.pop("source")
                if source is not None:  # text tasks: the whole input, beside the prompt the model saw
                    record = {"prompt": record.pop("prompt"), "source": source, **record}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
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
    device = device or default_device()
    opened = open_checkpoint(path, base, manifest, device)
    task, tokenizer = opened.task, opened.base.tokenizer
    # the data is read and checked (every row, every reference) before the model is built
    rows: Sequence[Row] | None
    if data_file is not None:
        rows = task.load_file(data_file, tokenizer)
        logged = None
    else:
        data = task.load_splits(tokenizer, [name])
        rows = data.train if name == "train" else data.evaluation[name]
        assert rows is not None
        logged = (manifest.get("metrics") or {}).get(name)
    model = place(opened.load().adapted.model, device)
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
    device = device or default_device()
    loaded = load_checkpoint(path, base, manifest, device)
    model = place(loaded.adapted.model, device)
    return loaded.task.complete(model, loaded.adapted.tokenizer, prompt, device, max_new_tokens)
