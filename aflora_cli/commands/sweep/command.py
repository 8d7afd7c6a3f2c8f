"""`aflora sweep SPEC`: run what is outstanding (or print its commands), then report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aflora_cli.commands.sweep.pool import Clock, collect, run_sweep, shell_command
from aflora_cli.commands.sweep.report import draw_front, print_report, report_markdown, summarize
from aflora_cli.commands.sweep.spec import load_sweep
from aflora_cli.errors import AfloraError


def sweep(
    spec_path: Path, *, jobs: int, gpus: list[str], print_commands: bool, report_only: bool, console: Any
) -> None:
    """Everything is checked (the spec, every grid point, the results file) before the first run starts."""
    if jobs < 1:
        raise AfloraError(f"--jobs {jobs}: expected 1 or more")
    clock = Clock()
    sweep = clock.measure(lambda: load_sweep(spec_path))
    progress = collect(sweep, clock)
    if print_commands:
        for run in progress.plan():
            print(shell_command(sweep, run))
        return
    ran = 0
    if not report_only:
        ran = run_sweep(sweep, jobs, gpus, lambda line: console.print(line, highlight=False), clock)
        progress = collect(sweep, clock)

    def write_report() -> list[Path]:
        rows = summarize(sweep, progress)
        out = sweep.output_dir
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(report_markdown(sweep, rows), encoding="utf-8")
        print_report(sweep, rows, console)
        return [out / "report.md", *draw_front(sweep, rows, [out / "front.png", out / "front.svg"])]

    written = clock.measure(write_report)
    console.print(f"wrote {', '.join(map(str, written))}", highlight=False)
    if ran:
        share = 100 * clock.own / clock.runs if clock.runs else 0.0
        console.print(
            f"{ran} run(s) took {clock.runs:.1f} s; the sweep's own planning, bookkeeping and report "
            f"{clock.own:.2f} s ({share:.2f} % of the runs' time)",
            highlight=False,
        )
