"""`aflora sweep`'s own time (planning, bookkeeping, report and picture) against its runs' time, on a real sweep.

    python benchmarks/sweep_overhead.py

Replays benchmarks/sweeps/front-movie-reviews.yaml over its 50 committed runs in a temporary output_dir, timed
with the sweep's own clock (RESULTS.md says what is counted).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from legacy_results import spec_records
from rich.console import Console

from aflora_cli.commands.sweep.plan import append_record
from aflora_cli.commands.sweep.pool import Clock, collect
from aflora_cli.commands.sweep.report import draw_front, print_report, report_markdown, summarize
from aflora_cli.commands.sweep.spec import Sweep, load_sweep

SPEC = Path(__file__).resolve().parent / "sweeps" / "front-movie-reviews.yaml"


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="aflora-sweep-overhead-") as tmp:
        folder = Path(tmp)

        def load() -> Sweep:
            """The spec, validated, with its output in the temporary folder."""
            sweep = load_sweep(SPEC)
            sweep.output_dir, sweep.results_file = folder, folder / "results.jsonl"
            return sweep

        sweep = load()
        records = spec_records(sweep)
        for record in records:
            append_record(sweep, record)
        clock = Clock()
        sweep = clock.measure(load)
        for _ in records:
            progress = collect(sweep, clock)
            clock.measure(progress.plan)

        def report() -> None:
            rows = summarize(sweep, progress)
            (folder / "report.md").write_text(report_markdown(sweep, rows), encoding="utf-8")
            with open(os.devnull, "w") as quiet:
                print_report(sweep, rows, Console(file=quiet))
            draw_front(sweep, rows, [folder / "front.png", folder / "front.svg"])

        clock.measure(report)
    runs = sum(r["seconds"] for r in records)
    print(
        f"{len(records)} runs, {runs:,.0f} s of training; the sweep's own planning, bookkeeping and report: "
        f"{clock.own:.2f} s = {100 * clock.own / runs:.3f} % of it"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
