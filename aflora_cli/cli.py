"""The `aflora` command line: parses arguments, calls the engine, renders results."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml
from rich.console import Console
from rich.table import Table

from aflora_cli.errors import AfloraError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False)
console = Console()
errors = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


@app.callback()
def _root() -> None:
    """Fine-tune transformers with AFLoRA adapters: train, eval, merge, inspect."""


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def user_errors(command: F) -> F:
    """Turn an AfloraError into one line on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            _quiet_libraries()
            return command(*args, **kwargs)
        except AfloraError as err:
            errors.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            errors.print("interrupted; `aflora train RECIPE --resume` continues from the last checkpoint")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


@app.command()
@user_errors
def train(
    recipe_path: Annotated[Path, typer.Argument(metavar="RECIPE", help="YAML recipe")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a key: training.max_steps=40")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in output_dir from its last checkpoint")] = False,
    dry_run: Annotated[bool, typer.Option(help="print the resolved recipe, targets and parameter counts, then exit")] = False,
) -> None:
    """Fine-tune from a recipe and write checkpoints to its output_dir."""
    from aflora_cli.progress import TrainingProgress, format_metrics
    from aflora_cli.recipe import load_recipe
    from aflora_cli.trainer import Trainer

    recipe = load_recipe(recipe_path, set_)
    trainer = Trainer(recipe, resume=resume)
    trainer.prepare()
    try:
        if dry_run:
            _print_plan(trainer)
            return
        with TrainingProgress(console) as progress:
            trainer.on_event = progress
            final = trainer.train()
        if trainer.group.is_main:
            console.print(f"done: {format_metrics(final['eval'])}" if final else "done")
            console.print(f"checkpoints: {recipe.output_dir}/last, {recipe.output_dir}/best")
    finally:
        trainer.close()


def _print_plan(trainer: Any) -> None:
    recipe, sched = trainer.recipe, trainer.schedule
    console.print(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False).rstrip(), highlight=False)
    table = Table(title="targets")
    for column in ("module", "kind", "PMs"):
        table.add_column(column)
    for target in trainer.adapted.targets:
        table.add_row(target.name, target.kind, target.policy)
    console.print(table)
    without, with_head = trainer.start_counts
    console.print(
        f"trainable parameters at start: {without:,} without the head, {with_head:,} with it; "
        f"adaptive PMs: {trainer.freezer.num_units} units\n"
        f"steps: T = {sched.total_steps} ({sched.steps_per_epoch} per epoch), t_i = {sched.t_i}, "
        f"t_f = {sched.t_f}, warmup = {sched.warmup_steps}"
    )
