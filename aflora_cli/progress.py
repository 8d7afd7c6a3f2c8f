"""A rich progress display for training, fed by the trainer's events."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def format_metrics(split_metrics: dict[str, dict[str, float]]) -> str:
    """`validation: accuracy 0.8120, f1 0.8011` for each split."""
    return "; ".join(
        f"{split}: " + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
        for split, metrics in split_metrics.items()
    )


class TrainingProgress:
    """Progress bar with loss, learning rate, trainable parameters and frozen PMs; evals printed above it."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
        )
        self.task: Any = None

    def __enter__(self) -> TrainingProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, kind: str, record: dict[str, Any]) -> None:
        if kind == "start":
            self.task = self.progress.add_task(
                "train", total=record["total_steps"], completed=record["step"], status=self._status(record)
            )
        elif kind == "step":
            self.progress.update(self.task, completed=record["step"], status=self._status(record))
            if not record["finite"]:
                self.console.print(f"[yellow]step {record['step']}: non-finite loss or gradient, step skipped")
        elif kind == "eval":
            self.console.print(
                f"step {record['step']} (epoch {record['epoch']:.2f}) — {format_metrics(record['eval'])}"
            )
        elif kind == "save" and record["best"]:
            self.console.print(f"[green]step {record['step']}: new best checkpoint")

    @staticmethod
    def _status(record: dict[str, Any]) -> str:
        loss = f"loss {record['loss']:.4f} " if "loss" in record else ""
        lr = f"lr {record['lr']:.2e} " if "lr" in record else ""
        return f"{loss}{lr}trainable {record['trainable']:,} frozen PMs {record['frozen_pms']}"
