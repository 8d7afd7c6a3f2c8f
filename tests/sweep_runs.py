"""A tiny model on disk and sweep specs over it, for the `aflora sweep` tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def base_recipe(model: Path, steps: int = 4, save_every: int | None = None) -> dict[str, Any]:
    training: dict[str, Any] = {"max_steps": steps, "batch_size": 8, "max_length": 16, "log_every": 100}
    if save_every:
        training["save_every"] = save_every
    return {
        "output_dir": "unused",
        "device": "cpu",
        "model": {"name_or_path": str(model)},
        "data": {"task": "movie_reviews", "max_train_samples": 32, "max_eval_samples": 16},
        "adapter": {"method": "aflora", "rank": 2},
        "freezing": {"t_i": 1, "t_f": 1},
        "training": training,
    }


def spec(output_dir: Path, **changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "recipe": "base.yaml",
        "output_dir": str(output_dir),
        "settings": {
            "aflora_r2": {"adapter.method": "aflora", "adapter.rank": 2},
            "lora_r1": {"adapter.method": "lora", "adapter.rank": 1},
        },
        "lr": {"ladder": [1e-3, 1e-2], "head_lr": "same"},
        "seeds": [0, 1],
        "selection": {"split": "validation", "metric": "accuracy"},
        "reported_split": "test",
        "baseline": "lora_r1",
    }
    raw.update(changes)
    return raw


def write_spec(folder: Path, raw_spec: dict[str, Any], recipe: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw_spec, sort_keys=False), encoding="utf-8")
    return path
