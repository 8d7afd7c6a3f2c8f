"""Rich progress displays for training (fed by the trainer's events) and for long evaluations."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from aflora_cli.tasks import paired_gain


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
        self.eval_task: Any = None

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
        elif kind == "eval_progress":
            self._eval_rows(record)
        elif kind == "skipped_rows":
            self.console.print(
                f"[yellow]{record['split']}: {record['rows']} rows skipped: their prompt leaves no room for the "
                "response within the length limit"
            )
        elif kind == "uncached_split":
            self.console.print(
                f"[yellow]{record['split']}: encoded, but not kept in the cache ({record['why']}); "
                "the next run encodes it again"
            )
        elif kind == "eval":
            if self.eval_task is not None:
                self.progress.remove_task(self.eval_task)
                self.eval_task = None
            self.console.print(
                f"step {record['step']} (epoch {record['epoch']:.2f}) — {format_metrics(record['eval'])}"
            )
        elif kind == "stopping":
            again = "; Ctrl-C again aborts at once" if record["signal"] == "SIGINT" else ""
            self.console.print(
                f"[yellow]{record['signal']}: finishing step {record['step'] + 1} and saving last, then stopping{again}"
            )
        elif kind == "save" and record["best"]:
            self.console.print(f"[green]step {record['step']}: new best checkpoint")

    def _eval_rows(self, record: dict[str, Any]) -> None:
        """A second bar while an evaluation generates, removed when its metrics are printed."""
        description = f"eval {record['split']}"
        if self.eval_task is None:
            self.eval_task = self.progress.add_task(description, total=record["total"], status="")
        self.progress.update(self.eval_task, completed=record["done"], total=record["total"], description=description)

    @staticmethod
    def _status(record: dict[str, Any]) -> str:
        loss = f"loss {record['loss']:.4f} " if "loss" in record else ""
        lr = f"lr {record['lr']:.2e} " if "lr" in record else ""
        return f"{loss}{lr}trainable {record['trainable']:,} frozen PMs {record['frozen_pms']}"


class RowProgress:
    """A transient bar over the rows of a long evaluation; call it with (rows done, rows in all).

    The bar starts with the first rows scored: a command that fails before (bad input) prints its one error
    line and nothing else (a started bar leaves an empty line behind on a screen that is not a terminal)."""

    def __init__(self, console: Console, label: str) -> None:
        self.progress = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.task: Any = None

    def __enter__(self) -> RowProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.task is not None:
            self.progress.stop()

    def __call__(self, done: int, total: int) -> None:
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("rows", total=total)
        self.progress.update(self.task, completed=done, total=total)


def compare_with_start(trainer: Any, final: dict[str, Any]) -> str:
    """The main metric before training and after, per eval split, with the paired gain over the same rows."""
    metric = trainer.task.main_metric
    lines = []
    for split, after in final["eval"].items():
        before = trainer.start_eval["eval"].get(split, {})
        if metric not in before or metric not in after:
            continue
        line = f"{split} {metric}: {before[metric]:.4f} before training, {after[metric]:.4f} after"
        gain = paired_gain(trainer.start_predictions.get(split, []), trainer.predictions.get(split, []), metric)
        if gain is not None:
            rows = len(trainer.predictions[split])
            line += f" (gain {gain[0]:+.4f} ± {gain[1]:.4f}, 95 % interval over the same {rows} rows)"
        lines.append(line)
    return "\n".join(lines)
