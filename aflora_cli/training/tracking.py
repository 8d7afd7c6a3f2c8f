"""Metrics to TensorBoard: the trainer hands every `metrics.jsonl` record here too, so both hold the same values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aflora_cli.errors import AfloraError

TENSORBOARD_DIR = "tensorboard"
INSTALL_HINT = "pip install 'aflora[tensorboard]'"

# step-record key -> tag; the first four are the Hugging Face Trainer's names, so dashboards line up
TRAIN_TAGS = {
    "loss": "train/loss",
    "lr": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "epoch": "train/epoch",
    "trainable": "train/trainable_params",
    "frozen_pms": "train/frozen_pms",
}


def summary_writer_class() -> type[Any]:
    """torch's SummaryWriter, imported only when asked for, since tensorboard is an optional extra."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise AfloraError(
            f"logging.tensorboard: the tensorboard package is not installed; run {INSTALL_HINT}"
        ) from None
    return SummaryWriter


def eval_prefix(split: str, first: bool) -> str:
    """`eval` for the first eval split, `eval_<split>` for the others.

    The first split is the one that picks the best checkpoint, and a single eval set is logged as `eval/...`
    by the Hugging Face Trainer too; further splits get a section of their own so their curves never mix.
    """
    return "eval" if first else f"eval_{split}"


class TensorBoardTracker:
    """Scalars for one run under `<output_dir>/tensorboard/`, with each record's `step` as global step."""

    def __init__(self, output_dir: Path, writer_class: type[Any], resume_step: int = 0) -> None:
        self.log_dir = output_dir / TENSORBOARD_DIR
        self.writer_class = writer_class
        # on resume, hide what a crashed run logged after its checkpoint, as metrics.jsonl drops those lines
        self.purge_step = resume_step + 1 if resume_step else None
        self.writer: Any = None  # opened at the first record, so a dry run leaves no folder behind
        self.closed = False

    def log(self, record: dict[str, Any]) -> None:
        """Write one metrics.jsonl record: a step record or an evaluation; events (skipped rows) are not scalars."""
        if self.closed or "event" in record:
            return
        if self.writer is None:
            self.writer = self.writer_class(log_dir=str(self.log_dir), purge_step=self.purge_step)
        step = record["step"]
        if "eval" in record:
            for i, (split, metrics) in enumerate(record["eval"].items()):
                prefix = eval_prefix(split, first=i == 0)
                for metric, value in metrics.items():
                    if isinstance(value, int | float) and not isinstance(value, bool):
                        self.writer.add_scalar(f"{prefix}/{metric}", value, step)
            self.writer.flush()  # evaluations are rare and worth seeing at once
            return
        for key, tag in TRAIN_TAGS.items():
            if key in record:
                self.writer.add_scalar(tag, record[key], step)

    def close(self) -> None:
        """Flush and close the event file; safe to call twice (end of training, then Trainer.close)."""
        if self.writer is not None and not self.closed:
            self.writer.close()
        self.closed = True
