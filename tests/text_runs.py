"""Short real runs of the text families on tiny models (tests/tiny_lm.py) and the shipped movie reviews.

The tiny models and their tokenizer are written once per test process into a temporary folder, so recipes
name them like any local model directory. The task: a movie-review sentence as the prompt, its sentiment
word as the response.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from aflora_cli.tasks.tables import SHIPPED_DIR, read_table
from tiny_lm import save_model_dir, tiny_bart, tiny_llama_lm, tiny_t5, tiny_tokenizer

_BUILDERS: dict[str, Callable[..., PreTrainedModel]] = {
    "llama": tiny_llama_lm,
    "bart": tiny_bart,
    "t5": tiny_t5,
    # at a sane init scale, for learning assertions (see tiny_lm.py)
    "bart-sane-init": functools.partial(tiny_bart, wide=False),
    "t5-sane-init": functools.partial(tiny_t5, wide=False),
    # bitsandbytes' CPU 4-bit kernels need every quantized layer's output size to be a multiple of 32
    "llama-64": functools.partial(tiny_llama_lm, hidden=64, intermediate=128),
}


@functools.cache
def _folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="aflora-tiny-lm-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


@functools.cache
def model_dir(kind: str) -> Path:
    """A saved tiny model (a key of _BUILDERS) with the tiny tokenizer, loadable by path."""
    tokenizer = tiny_tokenizer()
    return save_model_dir(_BUILDERS[kind](tokenizer=tokenizer), tokenizer, _folder() / kind)


def review_rows(split: str, count: int) -> list[dict[str, str]]:
    """The first `count` shipped movie reviews of a split as prompt/response rows."""
    table = read_table(SHIPPED_DIR / "movie_reviews" / f"{split}.tsv")
    names = ("negative", "positive")
    return [
        {"prompt": f"Review: {sentence[:60]}\nSentiment:", "response": names[int(label)]}
        for sentence, label in zip(table["sentence"][:count], table["label"][:count], strict=True)
    ]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def review_files(folder: Path, train: int = 48, validation: int = 12) -> dict[str, Path]:
    return {
        "train_file": write_jsonl(folder / "train.jsonl", review_rows("train", train)),
        "validation_file": write_jsonl(folder / "validation.jsonl", review_rows("validation", validation)),
    }


def lm_recipe(output_dir: Path, kind: str, files: dict[str, Path], **sections: dict[str, Any]) -> dict[str, Any]:
    """A raw recipe for a run of a few seconds on a tiny model; `sections` update its sections key by key."""
    raw: dict[str, Any] = {
        "output_dir": str(output_dir),
        "seed": 3,
        "device": "cpu",
        "model": {"name_or_path": str(model_dir(kind))},
        "data": {
            "task": "custom",
            "format": "prompt_response",
            "metric": "exact_match",
            **{key: str(path) for key, path in files.items()},
        },
        "adapter": {"method": "aflora", "rank": 4},
        "freezing": {"t_i": "25%", "t_f": "25%"},  # T = 8 or 10: t_i = t_f = 2; a ramp at any T
        "training": {"max_steps": 8, "batch_size": 4, "max_length": 128, "lr": 1e-2, "log_every": 1},
        "eval": {"max_new_tokens": 4},
    }
    for name, values in sections.items():
        raw[name] = {**raw[name], **values} if isinstance(raw.get(name), dict) else values
    return raw
