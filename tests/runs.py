"""Small real training runs for tests: recipes on the shipped MiniLM model and movie-review data."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from aflora_cli.engine.base_model import resolve_model_dir
from aflora_cli.recipe import Recipe, parse_recipe
from aflora_cli.training.trainer import Trainer

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def tiny_bert_dir(path: Path, **config: Any) -> Path:
    """A 2-layer BERT of hidden size 32 (seed 0) with MiniLM's tokenizer, saved in `path` unless it is there
    already: `aflora train` loads it in a second. `config` overrides BertConfig's values."""
    if (path / "config.json").is_file():
        return path
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(MINILM))
    torch.manual_seed(0)
    settings = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48}
    BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, **(settings | config))).save_pretrained(
        path
    )
    tokenizer.save_pretrained(path)
    return path


def quick_recipe(output_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A raw recipe for a run of a few seconds; `sections` update its sections key by key."""
    raw: dict[str, Any] = {
        "output_dir": str(output_dir),
        "seed": 7,
        "device": "cpu",
        "model": {"name_or_path": MINILM},
        "data": {"task": "movie_reviews", "max_train_samples": 64, "max_eval_samples": 32},
        "adapter": {"method": "aflora", "rank": 4},
        "freezing": {"t_i": "25%", "t_f": "25%"},  # T = 8 or 10: t_i = t_f = 2; a ramp at any T
        "training": {"max_steps": 10, "batch_size": 8, "max_length": 32, "lr": 4e-3, "log_every": 1},
    }
    for name, values in sections.items():
        if isinstance(raw.get(name), dict):
            raw[name].update(values)
        else:
            raw[name] = values
    return raw


def run(raw: dict[str, Any], *, resume: bool = False, on_event: Any = None) -> Trainer:
    """Prepare and train a recipe to the end; returns the trainer for inspection."""
    trainer = Trainer(parse_recipe(copy.deepcopy(raw), "test recipe"), resume=resume, on_event=on_event)
    trainer.prepare()
    trainer.train()
    trainer.close()
    return trainer


def write_recipe(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def recipe_of(raw: dict[str, Any]) -> Recipe:
    return parse_recipe(copy.deepcopy(raw), "test recipe")
