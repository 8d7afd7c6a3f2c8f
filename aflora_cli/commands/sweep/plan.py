"""What a sweep has done and what comes next: the results file, the grid each setting's learning rate grows on,
the chosen rate, and the runs that can start now."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aflora_cli.commands.sweep.spec import Sweep
from aflora_cli.errors import AfloraError

MANIFEST_FILE = "adapter_config.json"  # the checkpoint's manifest (engine/manifest.py), read as plain JSON


@dataclass(frozen=True)
class Choice:
    """A setting's chosen learning rate (None: the recipe's own, when the spec has no ladder)."""

    lr: float | None


@dataclass(frozen=True)
class Run:
    """One `aflora train`: a setting at a learning rate (None when the spec has no ladder) and a seed."""

    setting: str
    lr: float | None
    seed: int

    def folder(self, sweep: Sweep) -> Path:
        rate = "" if self.lr is None else f"lr{self.lr:g}-"
        return sweep.output_dir / "runs" / self.setting / f"{rate}seed{self.seed}"

    def describe(self) -> str:
        rate = "" if self.lr is None else f" lr {self.lr:g}"
        return f"{self.setting}{rate} seed {self.seed}"


def grown_grid(
    start: list[float], ladder: list[float], score: Callable[[float], float | None], goal: str = "max"
) -> list[float]:
    """`start`'s rates, plus one `ladder` step past the edge holding the best score (the smaller rate on a tie),
    again while the new step is the best and the ladder goes on; stops at a rate not scored yet."""
    sign = 1.0 if goal == "max" else -1.0
    rates = sorted(set(start))
    while None not in (scores := [score(lr) for lr in rates]):
        best = max(zip(rates, scores, strict=True), key=lambda pair: (sign * (pair[1] or 0.0), -pair[0]))[0]
        step = 1 if best == rates[-1] else -1 if best == rates[0] else 0
        if len(rates) == 1:  # one rate is both edges: look up first, then down
            step = 1 if ladder.index(best) + 1 < len(ladder) else -1
        beyond = ladder.index(best) + step
        if step == 0 or not 0 <= beyond < len(ladder) or ladder[beyond] in rates:
            break
        rates = sorted({*rates, ladder[beyond]})
    return rates


def read_records(sweep: Sweep) -> list[dict[str, Any]]:
    """Every complete line of the results file (one cut short by a kill is skipped); a file written for another
    spec, or a setting recorded with other keys, is refused in one line."""
    path = sweep.results_file
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("spec_hash") != sweep.hash:
            raise AfloraError(
                f"{path}: written by another sweep spec (hash {record.get('spec_hash')}, this spec's is "
                f"{sweep.hash}); give this spec its own output_dir"
            )
        keys = sweep.spec.settings.get(record["setting"])
        if keys is not None and record["keys"] != keys:
            raise AfloraError(
                f"{path}: setting {record['setting']!r} was run with keys {record['keys']}, the spec now says "
                f"{keys}; rename the setting or give the spec its own output_dir"
            )
        records.append(record)
    return records


def append_record(sweep: Sweep, record: dict[str, Any]) -> None:
    """One JSON line under an exclusive lock, so that sweeps on several machines can share the file."""
    import fcntl

    sweep.results_file.parent.mkdir(parents=True, exist_ok=True)
    with sweep.results_file.open("a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write(json.dumps(record) + "\n")


def finished_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a run in `folder` that trained to its last step and was evaluated there; else None."""
    path = folder / "last" / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("metrics") and manifest.get("step") == manifest.get("freezing", {}).get("total_steps"):
        return manifest
    return None


def record_of(sweep: Sweep, run: Run, manifest: dict[str, Any], seconds: float | None) -> dict[str, Any]:
    """A finished run's line in the results file: its key, its metrics on every split, its trainable counts."""
    counts = manifest["trainable_params"]
    return {
        "spec_hash": sweep.hash,
        "setting": run.setting,
        "keys": sweep.spec.settings[run.setting],
        "lr": run.lr,
        "seed": run.seed,
        "metrics": manifest["metrics"],
        "trainable_average": counts["average"],
        "trainable_end": counts["end"],
        "trainable_start": counts["start"],
        "steps": manifest["step"],
        "seconds": seconds,
    }


class Progress:
    """The sweep's records by run, and what they imply: each setting's grid, its chosen rate, its seeds."""

    def __init__(self, sweep: Sweep, records: list[dict[str, Any]]) -> None:
        self.sweep = sweep
        self.by_run = {Run(r["setting"], r["lr"], r["seed"]): r for r in records}

    def score(self, run: Run) -> float | None:
        """The run's selection metric; None if it has not run."""
        record = self.by_run.get(run)
        if record is None:
            return None
        selection = self.sweep.spec.selection
        split = record["metrics"].get(selection.split)
        if split is None or selection.metric not in split:
            have = {name: sorted(values) for name, values in record["metrics"].items()}
            raise AfloraError(
                f"{self.sweep.path}: selection: run {run.describe()} has no {selection.metric!r} on split "
                f"{selection.split!r}; it has {have}"
            )
        return float(split[selection.metric])

    def grid(self, name: str) -> list[float | None]:
        """The rates seed 0 runs at so far (the ladder grown past an edge while the best sits there)."""
        spec = self.sweep.spec
        if spec.lr is None:
            return [None]
        first = spec.seeds[0]
        rates = grown_grid(
            spec.lr.first, spec.lr.ladder, lambda lr: self.score(Run(name, lr, first)), spec.selection.goal
        )
        return list(rates)

    def chosen(self, name: str) -> Choice | None:
        """The best rate of the grid once every point has run (the smaller one on a tie); None until then."""
        spec = self.sweep.spec
        first = spec.seeds[0]
        scored = [(lr, self.score(Run(name, lr, first))) for lr in self.grid(name)]
        if any(score is None for _, score in scored):
            return None
        sign = 1.0 if spec.selection.goal == "max" else -1.0
        return Choice(max(scored, key=lambda pair: (sign * (pair[1] or 0.0), -(pair[0] or 0.0)))[0])

    def seeds(self, name: str) -> dict[int, dict[str, Any]]:
        """The runs at the chosen rate, by seed."""
        choice = self.chosen(name)
        if choice is None:
            return {}
        found = {seed: self.by_run.get(Run(name, choice.lr, seed)) for seed in self.sweep.spec.seeds}
        return {seed: record for seed, record in found.items() if record is not None}

    def plan(self) -> list[Run]:
        """The runs not done that can start now, setting by setting in the spec's order: grid, then seeds."""
        spec = self.sweep.spec
        planned: list[Run] = []
        for name in spec.settings:
            planned += [Run(name, lr, spec.seeds[0]) for lr in self.grid(name)]
            choice = self.chosen(name)
            if choice is not None:
                planned += [Run(name, choice.lr, seed) for seed in spec.seeds[1:]]
        return [run for run in planned if run not in self.by_run]
