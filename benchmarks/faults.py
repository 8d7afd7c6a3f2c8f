"""Faults tried / survived: `aflora train` on a shortened quickstart under SIGKILLs at random instants (some inside
a save, through the AFLORA_FAULT hook), SIGTERMs, ENOSPC/EACCES at each write of a save, corrupt files, two
writers at once and a forced divergence. After each fault the run is resumed to its end and compared with an
uninterrupted run: bit-identical adapter weights, the same freeze log, the same metrics.jsonl. A fault is
survived when nothing is lost (or it is refused in one line, exit 2) and no process printed a traceback.

    nice -n 10 python benchmarks/faults.py --out benchmarks/results/faults.json [--kills 50 --terms 10] [--phases …]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import OFFLINE, QUICKSTART, train_command, write_json

# the quickstart, shortened to fit many runs: 24 steps of 32 rows, saves every 4, evaluations every 8
SHORT = [
    "device=cpu",
    "data.max_train_samples=768",
    "data.max_eval_samples=64",
    "training.max_steps=24",
    "training.save_every=4",
    "training.eval_every=8",
    "training.log_every=1",
]
SAVE_POINTS = ("weights", "extra", "manifest", "fsync", "moved_old", "renamed")
ENV = {**OFFLINE, "OMP_NUM_THREADS": "1"}
PHASES = ("divergence", "two-writers", "disk", "corrupt", "sigterm", "sigkill")


def refusal(code: int, stderr: str) -> str:
    """The one line a refused run prints (exit 2), or "" when it exited otherwise or printed more."""
    lines = stderr.strip().splitlines()
    return lines[0] if code == 2 and len(lines) == 1 else ""


def outcome(output_dir: Path) -> tuple[dict[str, Any], Any, str]:
    """What a finished run leaves: its last adapter weights, its freeze log and its metrics.jsonl."""
    from safetensors.torch import load_file

    last = output_dir / "last"
    manifest = json.loads((last / "adapter_config.json").read_text(encoding="utf-8"))
    metrics = (output_dir / "metrics.jsonl").read_text(encoding="utf-8")
    return load_file(str(last / "adapter_model.safetensors")), manifest["freeze_log"], metrics


def wait_until(process: subprocess.Popen[str], ready: Callable[[], bool]) -> None:
    """Poll until `ready()` or until the process has ended."""
    while process.poll() is None and not ready():
        time.sleep(0.05)


class Harness:
    def __init__(self, work: Path, seed: int, timeout: float) -> None:
        self.work, self.rng, self.timeout = work, random.Random(seed), timeout
        self.tried: Counter[str] = Counter()
        self.survived: Counter[str] = Counter()
        self.failures: list[dict[str, Any]] = []
        self.launches = self.tracebacks = 0
        self.duration = 0.0

    def start(self, output_dir: Path, *extra: str, fault: str | None = None) -> subprocess.Popen[str]:
        """`aflora train` of the short run (resumed when the folder holds one), with an AFLORA_FAULT if given."""
        resume = any(any(output_dir.glob(name)) for name in ("metrics.jsonl", "last", ".last.old-*"))
        command = [*train_command(QUICKSTART, output_dir, *SHORT, *extra), *(["--resume"] if resume else [])]
        env = {**ENV, **({"AFLORA_FAULT": fault} if fault else {})}
        self.launches += 1
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(self, process: subprocess.Popen[str]) -> tuple[int, str]:
        try:
            _, stderr = process.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        self.tracebacks += int("Traceback" in stderr)
        return process.returncode, stderr

    def run_to_end(self, output_dir: Path, *extra: str, fault: str | None = None) -> tuple[int, str]:
        return self.finish(self.start(output_dir, *extra, fault=fault))

    def same_as_reference(self, output_dir: Path) -> str | None:
        """None if the run ended exactly like the uninterrupted one, else what differs."""
        if not (output_dir / "last" / "adapter_config.json").is_file():
            return "no last checkpoint"
        (weights, freeze_log, metrics), (ref, ref_log, ref_metrics) = outcome(output_dir), self.reference_outcome
        if weights.keys() != ref.keys() or any(not weights[k].equal(ref[k]) for k in ref):
            return "adapter weights differ"
        if freeze_log != ref_log:
            return "freeze log differs"
        return None if metrics == ref_metrics else "metrics.jsonl differs"

    def count(self, kind: str, ok: bool, detail: str, **where: str) -> None:
        self.tried[kind] += 1
        if ok:
            self.survived[kind] += 1
        else:
            self.failures.append({"kind": kind, **where, "detail": detail})

    def record(self, kind: str, output_dir: Path, ok: bool, detail: str = "") -> None:
        """Count one fault of `kind`; survived if `ok` and the run, resumed to its end, equals the reference."""
        if ok:
            code, stderr = self.run_to_end(output_dir)
            differs = self.same_as_reference(output_dir) if code == 0 else f"resume exited {code}: {stderr[-300:]}"
            ok, detail = differs is None, f"{detail} {differs}".strip()
        self.count(kind, ok, detail, output_dir=str(output_dir))
        if ok:
            shutil.rmtree(output_dir, ignore_errors=True)
        else:
            print(f"  FAILED {kind}: {detail}", flush=True)

    def fresh(self, name: str) -> Path:
        path = self.work / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    def reference(self) -> None:
        out = self.fresh("reference")
        began = time.monotonic()
        code, stderr = self.run_to_end(out)
        assert code == 0, stderr
        self.duration = time.monotonic() - began
        self.reference_outcome = outcome(out)
        print(f"reference run: {self.duration:.0f} s", flush=True)

    def sigkills(self, count: int, per_run: int = 5) -> None:
        """Chains of SIGKILLs: each launch (fresh or resumed) is killed at a random instant, a third of them inside
        a save through the hook; after `per_run` kills (or when a launch got to the end first) the run is resumed to
        its end and compared. Only launches that were really killed count."""
        done, chain = 0, 0
        while done < count:
            out = self.fresh(f"kill-{chain}")
            chain += 1
            kills, ok, detail = 0, True, ""
            while kills < min(per_run, count - done):
                if self.rng.random() < 1 / 3:
                    fault = f"{self.rng.choice(SAVE_POINTS)}#{self.rng.randint(1, 4)}:kill"
                    code, stderr = self.run_to_end(out, fault=fault)
                else:
                    process = self.start(out)
                    with contextlib.suppress(subprocess.TimeoutExpired):  # it may reach its end first
                        process.wait(self.rng.uniform(0.5, self.duration))
                    process.send_signal(signal.SIGKILL)
                    code, stderr = self.finish(process)
                if code == -signal.SIGKILL:
                    kills += 1
                elif code == 0:
                    break  # the run reached its end before the kill
                else:
                    ok, detail = False, f"launch exited {code}: {stderr[-300:]}"
                    break
            if kills == 0 and ok:
                continue
            self.tried["sigkill"] += kills - 1  # the chain's last kill is counted by `record`
            before = self.survived["sigkill"]
            self.record("sigkill", out, ok, detail)
            if self.survived["sigkill"] > before:
                self.survived["sigkill"] += kills - 1
            done += max(kills, 1)
            print(f"sigkill: {self.survived['sigkill']}/{self.tried['sigkill']}", flush=True)

    def sigterms(self, count: int) -> None:
        for i in range(count):
            out = self.fresh(f"term-{i}")
            process, metrics, wanted = self.start(out), out / "metrics.jsonl", self.rng.randint(1, 20)
            wait_until(process, lambda m=metrics, n=wanted: m.exists() and m.read_text().count('"loss"') >= n)
            process.send_signal(signal.SIGTERM)
            code, stderr = self.finish(process)
            line = stderr.strip().splitlines()[-1] if stderr.strip() else ""
            ok = code == 0 or (code == 143 and line.startswith("stopped by SIGTERM at step") and "--resume" in line)
            if code == 143:
                step = json.loads((out / "last" / "adapter_config.json").read_text())["step"]
                ok = ok and f"at step {step}:" in line
            self.record("sigterm", out, ok, f"exit {code}: {line}")
            print(f"sigterm: {self.survived['sigterm']}/{self.tried['sigterm']}", flush=True)

    def disk_errors(self) -> None:
        """ENOSPC and EACCES at each write point of the second save: one line, exit 2, `last` intact."""
        for action in ("enospc", "eacces"):
            for point in SAVE_POINTS[:-1]:
                out = self.fresh(f"{action}-{point}")
                code, stderr = self.run_to_end(out, fault=f"{point}#2:{action}")
                ok = refusal(code, stderr).startswith("error: could not write the checkpoint")
                self.record(action, out, ok, f"exit {code}: {stderr[-200:]}")
        print(f"disk: {dict(self.survived)}", flush=True)

    def corrupt_files(self) -> None:
        """Each kind of damage to each weights/state file of `last`: `--resume` refuses in one line naming the
        file; with the file put back, the run resumes to its end."""
        out = self.fresh("corrupt")
        process = self.start(out)
        wait_until(process, (out / "last").is_dir)
        process.send_signal(signal.SIGTERM)
        self.finish(process)
        for name in ("adapter_model.safetensors", "training_state.pt"):
            for damage in ("truncated", "empty", "one bit flipped"):
                file = out / "last" / name
                good = file.read_bytes()
                bad = bytearray(good[: len(good) // 2] if damage == "truncated" else b"" if damage == "empty" else good)
                if damage == "one bit flipped":
                    bad[self.rng.randrange(len(bad))] ^= 1 << self.rng.randrange(8)
                file.write_bytes(bytes(bad))
                code, stderr = self.run_to_end(out)
                file.write_bytes(good)
                ok = str(file) in refusal(code, stderr)
                self.count("corrupt file", ok, f"{name} {damage}: exit {code}: {stderr[-300:]}")
        self.record("corrupt file (resumed after)", out, True)
        print(f"corrupt: {self.survived['corrupt file']}/{self.tried['corrupt file']}", flush=True)

    def two_writers(self, count: int = 2) -> None:
        for i in range(count):
            out = self.fresh(f"two-{i}")
            first = self.start(out)
            wait_until(first, (out / "metrics.jsonl").exists)
            code, stderr = self.run_to_end(out)
            refused = "is in use by another aflora train" in refusal(code, stderr)
            first_code, _ = self.finish(first)
            ok = refused and first_code == 0
            self.record("two writers", out, ok, f"second exit {code}: {stderr[-200:]}; first exit {first_code}")

    def divergence(self) -> None:
        """lr 1e30: the weights overflow within a few steps; the run must stop in one line, `last` finite."""
        out = self.fresh("diverged")
        code, stderr = self.run_to_end(out, "training.lr=1e30", "training.head_lr=1e30")
        ok = refusal(code, stderr).startswith("error: training diverged at step")
        if ok and (out / "last").is_dir():
            ok = all(bool(t.isfinite().all()) for t in outcome(out)[0].values())
        self.count("divergence", ok, f"exit {code}: {stderr[-300:]}")
        print(f"divergence: {(stderr.strip().splitlines() or [''])[-1]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the counts as JSON here")
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--terms", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one launch may take")
    parser.add_argument("--work", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES), help="which faults to try")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="aflora-faults-"))
    harness = Harness(work, args.seed, args.timeout)
    began = time.monotonic()

    def dump(complete: bool) -> None:
        """The counts so far (written after every phase, so a sweep cut short still leaves its figures)."""
        result = {
            "command": f"nice -n {os.nice(0)} python benchmarks/faults.py " + " ".join(sys.argv[1:]),
            "run": "recipes/quickstart.yaml with " + " ".join(f"--set {s}" for s in SHORT),
            "tried": dict(harness.tried),
            "survived": dict(harness.survived),
            "total_tried": sum(harness.tried.values()),
            "total_survived": sum(harness.survived.values()),
            "launches": harness.launches,
            "tracebacks": harness.tracebacks,
            "failures": harness.failures,
            "reference_run_seconds": round(harness.duration, 1),
            "wall_seconds": round(time.monotonic() - began, 1),
            "complete": complete,
        }
        print(json.dumps({k: v for k, v in result.items() if k != "failures"}), flush=True)
        if args.out:
            write_json(args.out, result)

    harness.reference()
    phases = {
        "divergence": harness.divergence,
        "two-writers": harness.two_writers,
        "disk": harness.disk_errors,
        "corrupt": harness.corrupt_files,
        "sigterm": lambda: harness.sigterms(args.terms),
        "sigkill": lambda: harness.sigkills(args.kills),
    }
    for name in args.phases:
        phases[name]()
        dump(complete=False)
    dump(complete=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
