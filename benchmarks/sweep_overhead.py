"""`aflora sweep`'s own time (planning, bookkeeping, report and picture) against its runs' time, on a real sweep.

    python benchmarks/sweep_overhead.py

Replays benchmarks/sweeps/front-movie-reviews.yaml over its 50 committed runs (benchmarks/legacy_results.py) in a
temporary output_dir: the spec is loaded and validated, the plan is made once per run (as a sweep does whenever a
run finishes, reading the results file each time), then the report, the terminal table and both pictures are
written — all timed with the sweep's own clock and compared with the runs' recorded training time.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import yaml
from legacy_results import RAW, SOURCES, sweep_records
from rich.console import Console

from aflora_cli.commands.sweep.plan import append_record
from aflora_cli.commands.sweep.pool import Clock, collect
from aflora_cli.commands.sweep.report import draw_front, print_report, report_markdown, summarize
from aflora_cli.commands.sweep.spec import load_sweep

HERE = Path(__file__).resolve().parent


def main() -> int:
    folder = Path(tempfile.mkdtemp(prefix="aflora-sweep-overhead-"))
    try:
        raw = yaml.safe_load((HERE / "sweeps" / "front-movie-reviews.yaml").read_text(encoding="utf-8"))
        raw["recipe"] = str(HERE / "sweeps" / raw["recipe"])
        raw["output_dir"] = str(folder / "out")
        spec = folder / "spec.yaml"
        spec.write_text(yaml.safe_dump(raw), encoding="utf-8")
        sweep = load_sweep(spec)
        files, task = SOURCES["front-movie-reviews.yaml"]
        records = sweep_records(sweep, [RAW / name for name in files], lambda r: r["task"] == task)
        for record in records:
            append_record(sweep, record)
        clock = Clock()
        sweep = clock.measure(lambda: load_sweep(spec))
        for _ in records:
            progress = collect(sweep, clock)
            clock.measure(progress.plan)

        def report() -> None:
            rows = summarize(sweep, progress)
            (sweep.output_dir / "report.md").write_text(report_markdown(sweep, rows), encoding="utf-8")
            with open("/dev/null", "w") as quiet:
                print_report(sweep, rows, Console(file=quiet))
            draw_front(sweep, rows, [sweep.output_dir / "front.png", sweep.output_dir / "front.svg"])

        clock.measure(report)
        runs = sum(r["seconds"] for r in records)
        print(
            f"{len(records)} runs, {runs:,.0f} s of training; the sweep's own planning, bookkeeping and report: "
            f"{clock.own:.2f} s = {100 * clock.own / runs:.3f} % of it"
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
