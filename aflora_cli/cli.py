"""The `aflora` command line: parses arguments, calls the engine, renders results."""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from aflora_cli.errors import AfloraError

console = Console()
errors = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])
# click's UsageError (unknown option, missing argument, bad value), found through the one subclass Typer exports:
# Typer vendors its own click, so `click.UsageError` may be another class
_UsageError: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def _error_line(message: str) -> None:
    errors.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def _usage_errors_in_one_line() -> Iterator[None]:
    """An unknown option, a missing argument or a bad value: one line on stderr and exit code 2, like every other
    bad input (not click's usage block and framed message)."""
    try:
        yield
    except _UsageError as err:
        if type(err).__name__ == "NoArgsIsHelpError":
            raise  # `aflora` alone prints the help
        context = getattr(err, "ctx", None)
        where = f"; see '{context.command_path} --help'" if context is not None else ""
        _error_line(f"{err.format_message().rstrip('.')}{where}")  # type: ignore[attr-defined]
        raise typer.Exit(2) from None


class _Commands(TyperGroup):
    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with _usage_errors_in_one_line():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with _usage_errors_in_one_line():
            return super().invoke(ctx)


# Each command's help ends by naming its section of the documentation (docs/ in the repository; `mkdocs serve`
# builds it into a site)
DOCS = "docs/commands.md"
app = typer.Typer(
    cls=_Commands,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    epilog=f"Docs: {DOCS} (every command), docs/getting-started.md, docs/recipes-reference.md (every recipe key).",
)


def _docs(command: str) -> str:
    return f"Docs: {DOCS}#{command}"


@app.callback()
def _root() -> None:
    """Fine-tune transformers with AFLoRA adapters: train, eval, merge, inspect."""


def _quiet_libraries() -> None:
    """No progress bars or load reports from the libraries: the commands that load models print their own.
    (Not called by `inspect`, which must not pay for importing them.)"""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # `datasets` reads these when (if ever) it is imported: most runs never need it, and it costs a second
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def user_errors(command: F) -> F:
    """Turn an AfloraError into one line on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except AfloraError as err:
            _error_line(str(err))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            errors.print("interrupted", highlight=False)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


@app.command(epilog=_docs("train"))
@user_errors
def train(
    recipe_path: Annotated[Path, typer.Argument(metavar="RECIPE", help="YAML recipe")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a key: training.max_steps=40")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in output_dir from its last checkpoint")] = False,
    dry_run: Annotated[
        bool, typer.Option(help="print the resolved recipe, targets and parameter counts, then exit")
    ] = False,
) -> None:
    """Fine-tune from a recipe and write checkpoints to its output_dir."""
    from aflora_cli.recipe import load_recipe

    recipe = load_recipe(recipe_path, set_)  # a bad recipe is refused before torch and transformers load
    _quiet_libraries()
    from aflora_cli.training.progress import TrainingProgress, compare_with_start, format_metrics
    from aflora_cli.training.trainer import Trainer, TrainingStopped

    trainer = Trainer(recipe, resume=resume)
    trainer.prepare()
    try:
        if dry_run:
            _print_plan(trainer)
            return
        with TrainingProgress(console) as progress:
            trainer.on_event = progress
            try:
                final = trainer.train()
            except TrainingStopped as stop:
                if trainer.group.is_main:
                    errors.print(
                        f"{stop}: `aflora train {recipe_path} --resume` continues from {recipe.output_dir}/last",
                        highlight=False,
                        markup=False,
                        soft_wrap=True,
                    )
                raise typer.Exit(stop.exit_code) from None
            except KeyboardInterrupt:
                errors.print(
                    f"interrupted: `aflora train {recipe_path} --resume` continues from {recipe.output_dir}/last"
                )
                raise typer.Exit(130) from None
        if trainer.group.is_main:
            console.print(f"done: {format_metrics(final['eval'])}" if final and final["eval"] else "done")
            if trainer.start_eval and final and final["eval"]:
                console.print(compare_with_start(trainer, final), highlight=False)
            saved = [
                str(Path(recipe.output_dir) / name)
                for name in ("last", "best")
                if (Path(recipe.output_dir) / name).is_dir()
            ]
            console.print(f"checkpoints: {', '.join(saved)}")
    finally:
        trainer.close()


def _print_plan(trainer: Any) -> None:
    recipe, sched = trainer.recipe, trainer.schedule
    console.print(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False).rstrip(), highlight=False)
    from aflora_cli.commands.inspection import target_groups
    from aflora_cli.commands.report import layer_span

    table = Table(title=f"targets ({len(trainer.adapted.targets)} modules, family {trainer.task.family})")
    for column in ("module", "kind", "PMs", "where"):
        table.add_column(column)
    targets = [{"name": t.name, "kind": t.kind, "policy": t.policy} for t in trainer.adapted.targets]
    for group in target_groups({"targets": targets}):
        table.add_row(group["module"], group["kind"], group["policy"], layer_span(group["layers"]))
    console.print(table)
    without, with_head = trainer.start_counts
    head = f"{without:,} without the head, {with_head:,} with it" if trainer.adapted.head_names else f"{without:,}"
    console.print(
        f"trainable parameters at start: {head}; adaptive PMs: {trainer.freezer.num_units} units\n"
        f"steps: T = {sched.total_steps} ({sched.steps_per_epoch} per epoch), t_i = {sched.t_i}, "
        f"t_f = {sched.t_f}, warmup = {sched.warmup_steps}"
    )


@app.command("eval", epilog=_docs("eval"))
@user_errors
def eval_command(
    checkpoint: Annotated[Path, typer.Argument(metavar="CKPT", help="checkpoint directory (e.g. runs/x/best)")],
    split: Annotated[str | None, typer.Option(help="the task's split to score (default: its first eval split)")] = None,
    data: Annotated[
        Path | None, typer.Option(help="a local csv/tsv/jsonl/json/parquet file of the task's columns")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    base: Annotated[str | None, typer.Option(help="the base model's directory, if it moved since training")] = None,
    predictions: Annotated[
        Path | None, typer.Option(metavar="FILE.jsonl", help="write every row's input, output, answer and score")
    ] = None,
) -> None:
    """Score a checkpoint on its task's split, or on a local file, with the task's metric."""
    _quiet_libraries()
    from aflora_cli.commands.scoring import evaluate_checkpoint
    from aflora_cli.training.progress import RowProgress

    with RowProgress(errors, "eval") as progress:
        result = evaluate_checkpoint(
            checkpoint, split=split, data_file=data, base=base, predictions_file=predictions, progress=progress
        )
    if json_out:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        from aflora_cli.commands.report import render_eval

        render_eval(console, result)


@app.command(epilog=_docs("generate"))
@user_errors
def generate(
    checkpoint: Annotated[Path, typer.Argument(metavar="CKPT", help="checkpoint directory of a text task")],
    prompt: Annotated[str | None, typer.Option(help="the prompt (default: read from standard input)")] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(min=1, help="at most this many new tokens (default: the recipe's eval setting)")
    ] = None,
    base: Annotated[str | None, typer.Option(help="the base model's directory, if it moved since training")] = None,
) -> None:
    """Print the checkpoint's completion of a prompt, rendered as in training (template, chat template)."""
    _quiet_libraries()
    import sys

    from aflora_cli.commands.scoring import generate_text

    if prompt is None:
        if sys.stdin.isatty():
            raise AfloraError("no prompt: pass --prompt TEXT or pipe the prompt into standard input")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise AfloraError("the prompt is empty")
    typer.echo(generate_text(checkpoint, prompt, max_new_tokens=max_new_tokens, base=base))


class _Format(str, Enum):
    transformers = "transformers"
    peft = "peft"
    gguf = "gguf"


class _GGUFType(str, Enum):
    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    q8_0 = "q8_0"


class _DType(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


@app.command(epilog=_docs("merge"))
@user_errors
def merge(
    checkpoint: Annotated[Path, typer.Argument(metavar="CKPT", help="checkpoint directory (e.g. runs/x/best)")],
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="directory to write")],
    format_: Annotated[
        _Format,
        typer.Option("--format", help="a merged transformers model, a PEFT LoRA adapter, or a GGUF file (llama.cpp)"),
    ] = _Format.transformers,
    dtype: Annotated[
        _DType | None,
        typer.Option(help="dtype of the saved weights [default: fp32; bf16 merged from a quantized base]"),
    ] = None,
    gguf_type: Annotated[
        _GGUFType | None, typer.Option("--gguf-type", help="tensor type of a GGUF file's matrices (default f16)")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="replace DIR if it is not empty")] = False,
    base: Annotated[str | None, typer.Option(help="the base model's directory, if it moved since training")] = None,
    no_card: Annotated[bool, typer.Option("--no-card", help="write no model card (README.md)")] = False,
) -> None:
    """Fold the adapters into the base weights and save a plain transformers model (or export a PEFT adapter,
    or a GGUF file)."""
    _quiet_libraries()
    from aflora_cli.commands.merging import merge_checkpoint

    result = merge_checkpoint(
        checkpoint,
        out,
        format=format_.value,
        dtype=None if dtype is None else dtype.value,
        force=force,
        base=base,
        card=not no_card,
        gguf_type=gguf_type.value if gguf_type else None,
    )
    if result.format == "gguf":
        console.print(
            f"merged {result.modules} adapters into their base weights; wrote {result.gguf_file} "
            f"({result.dtype}) to {result.out}: run it with llama.cpp (llama-cli -m {result.out}/{result.gguf_file}), "
            f"Ollama or LM Studio",
            highlight=False,
            markup=False,
        )
    elif result.format == "peft":
        console.print(
            f"wrote a PEFT LoRA adapter for {result.modules} modules ({result.dtype}) to {result.out}: "
            f"load it with peft.PeftModel.from_pretrained(base_model, {str(result.out)!r})",
            highlight=False,
            markup=False,
        )
    else:
        console.print(
            f"merged {result.modules} adapters into their base weights; wrote a transformers model "
            f"({result.dtype}) to {result.out}: load it with "
            f"{result.auto_class}.from_pretrained({str(result.out)!r})",
            highlight=False,
            markup=False,
        )
        if result.logit_gap is not None:
            console.print(
                f"the base was quantized: it was dequantized to merge, so the merged model's logits differ from "
                f"the quantized adapter model's by up to {result.logit_gap:.1%} of the largest logit "
                "(two sample sentences)",
                highlight=False,
                markup=False,
            )


@app.command("inspect", epilog=_docs("inspect"))
@user_errors
def inspect_command(
    checkpoint: Annotated[Path, typer.Argument(metavar="CKPT", help="checkpoint directory (e.g. runs/x/best)")],
    json_out: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    plot: Annotated[
        Path | None, typer.Option("--plot", metavar="FILE", help="also draw the run as a .png or .svg figure")
    ] = None,
) -> None:
    """Show a checkpoint's run: summary, when each PM froze, trainable parameters over time, per-layer heat map."""
    from aflora_cli.commands.inspection import inspect_checkpoint

    if plot is not None:  # a bad FILE or no matplotlib: one error line before anything is printed
        from aflora_cli.commands.plotting import check_output

        check_output(plot)
    report = inspect_checkpoint(checkpoint)
    if json_out:
        typer.echo(json.dumps(report, indent=2))
    else:
        from aflora_cli.commands.report import render_inspect

        render_inspect(console, report)
    if plot is not None:
        from aflora_cli.commands.plotting import plot_checkpoint

        written = plot_checkpoint(report, plot)
        (errors if json_out else console).print(
            f"wrote the figure to {written}", highlight=False, markup=False, soft_wrap=True
        )


@app.command("sweep")
@user_errors
def sweep_command(
    spec: Annotated[Path, typer.Argument(metavar="SPEC", help="YAML sweep spec (see docs/sweep.md)")],
    jobs: Annotated[int, typer.Option(help="runs side by side; the CPU's threads are divided between them")] = 1,
    gpus: Annotated[
        str | None, typer.Option(metavar="0,1,...", help="one of these GPUs per run (CUDA_VISIBLE_DEVICES)")
    ] = None,
    print_commands: Annotated[
        bool, typer.Option("--print-commands", help="print the `aflora train` command of every run ready now")
    ] = False,
    report_only: Annotated[bool, typer.Option("--report", help="only report the results written so far")] = False,
) -> None:
    """Compare settings at their own best learning rate over seeds: train every run a spec implies, then report
    the metric against trainable parameters with paired differences against a baseline."""
    from aflora_cli.commands.sweep.command import sweep

    devices = [g.strip() for g in gpus.split(",") if g.strip()] if gpus else []
    sweep(
        spec,
        jobs=max(jobs, len(devices)) if devices and jobs == 1 else jobs,
        gpus=devices,
        print_commands=print_commands,
        report_only=report_only,
        console=console,
    )
