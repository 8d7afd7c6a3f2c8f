"""The sweep's runs as `aflora train` processes: `jobs` at a time, the CPU's threads divided between them (or one
GPU each), each ending with the sweep, and the plan made again whenever one finishes."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import yaml

from aflora_cli.commands.sweep.plan import Progress, Run, append_record, finished_manifest, read_records, record_of
from aflora_cli.commands.sweep.spec import Sweep
from aflora_cli.errors import AfloraError

POLL_SECONDS = 0.05
T = TypeVar("T")


@dataclass
class Clock:
    """Where a sweep's time went: inside its runs, and in its own planning, bookkeeping and report."""

    runs: float = 0.0
    own: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def measure(self, work: Callable[[], T]) -> T:
        start = time.perf_counter()
        try:
            return work()
        finally:
            self.own += time.perf_counter() - start


def yaml_value(value: object) -> str:
    """A value as `--set` reads it back (YAML, one line)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def train_arguments(sweep: Sweep, run: Run, resume: bool = False) -> list[str]:
    """`train RECIPE --set key=value ...` for one run (`--resume` to continue its checkpoint)."""
    keys = sweep.overrides(run.setting, run.lr, run.seed, run.folder(sweep))
    arguments = ["train", str(sweep.recipe_path)]
    for key, value in keys.items():
        arguments += ["--set", f"{key}={yaml_value(value)}"]
    return arguments + (["--resume"] if resume else [])


def shell_command(sweep: Sweep, run: Run) -> str:
    """The run's command for a scheduler's job script: `aflora train ...`, quoted for a POSIX shell; with
    `--resume` when the run has a checkpoint to continue."""
    resume = (run.folder(sweep) / "last").is_dir()
    return shlex.join(["aflora", *train_arguments(sweep, run, resume)])


def _end_with_parent() -> None:
    """In the child, before exec: the kernel sends SIGTERM when the sweep ends, however it ends (Linux)."""
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class _Running:
    run: Run
    process: subprocess.Popen[bytes]
    slot: int
    started: float


def collect(sweep: Sweep, clock: Clock, running: frozenset[Run] = frozenset()) -> Progress:
    """The records so far, plus any planned run that finished on disk without a record yet (one run by a
    scheduler, or one whose sweep was stopped before it wrote the line); runs still `running` here are left to
    the loop that waits for them."""

    def work() -> Progress:
        progress = Progress(sweep, read_records(sweep))
        while True:
            on_disk = {run: finished_manifest(run.folder(sweep)) for run in progress.plan() if run not in running}
            found = {run: manifest for run, manifest in on_disk.items() if manifest is not None}
            if not found:
                return progress
            for run, manifest in found.items():
                append_record(sweep, record_of(sweep, run, manifest, seconds=None))
            progress = Progress(sweep, read_records(sweep))

    return clock.measure(work)


def _start(sweep: Sweep, run: Run, slot: int, env: dict[str, str], gpus: list[str]) -> subprocess.Popen[bytes]:
    folder = run.folder(sweep)
    resume = (folder / "last").is_dir()
    if folder.exists() and not resume:
        shutil.rmtree(folder)  # stopped before its first checkpoint: nothing to continue
    folder.parent.mkdir(parents=True, exist_ok=True)
    env = dict(env)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    log = folder.parent / f"{folder.name}.log"
    with log.open("ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "aflora_cli", *train_arguments(sweep, run, resume)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            preexec_fn=_end_with_parent if sys.platform.startswith("linux") else None,
        )


def thread_share(jobs: int) -> int:
    """Torch threads for each of `jobs` processes sharing this machine's cores: more would oversubscribe them."""
    return max(1, (os.cpu_count() or 1) // jobs)


def worker_env(jobs: int, gpus: list[str]) -> dict[str, str]:
    """The environment of every run: its share of the CPU's threads (torch reads OMP_NUM_THREADS at start)."""
    threads = thread_share(jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_sweep(sweep: Sweep, jobs: int, gpus: list[str], say: Callable[[str], None], clock: Clock) -> int:
    """Every run the spec implies that is not recorded yet, `jobs` at a time; returns how many ran."""
    env = worker_env(jobs, gpus)
    running: list[_Running] = []
    finished = 0
    try:
        while True:
            busy = frozenset(r.run for r in running)
            progress = collect(sweep, clock, busy)
            ready = [run for run in clock.measure(progress.plan) if run not in busy]
            free = sorted(set(range(jobs)) - {r.slot for r in running})
            for run, slot in zip(ready, free, strict=False):
                resume = " (resumed)" if (run.folder(sweep) / "last").is_dir() else ""
                running.append(_Running(run, _start(sweep, run, slot, env, gpus), slot, time.perf_counter()))
                say(f"start {run.describe()}{resume}")
            if not running:
                return finished
            done = _wait_any(running)
            running.remove(done)
            seconds = time.perf_counter() - done.started
            clock.runs += seconds
            folder = done.run.folder(sweep)
            manifest = finished_manifest(folder)
            if done.process.returncode != 0 or manifest is None:
                raise AfloraError(
                    f"run {done.run.describe()} failed (exit code {done.process.returncode}); its output: "
                    f"{folder.parent / (folder.name + '.log')}"
                )
            record = record_of(sweep, done.run, manifest, seconds)
            clock.measure(functools.partial(append_record, sweep, record))
            finished += 1
            selection = sweep.spec.selection
            metrics = manifest["metrics"]
            value = metrics.get(selection.split, {}).get(selection.metric)
            shown = "—" if value is None else f"{value:.4f}"
            say(f"done  {done.run.describe()}: {selection.split} {selection.metric} {shown} in {seconds:.0f} s")
    finally:
        for r in running:  # stopped: the runs end with us, and resume from their last checkpoint next time
            r.process.terminate()
        for r in running:
            r.process.wait()


def _wait_any(running: list[_Running]) -> _Running:
    while True:
        for r in running:
            if r.process.poll() is not None:
                return r
        time.sleep(POLL_SECONDS)
