"""Short Hugging Face Trainer / TRL SFTTrainer runs with AfloraCallback, for tests: the shipped MiniLM on movie
reviews, and a tiny LLaMA (tests/text_runs.py) on review sentiment words."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from safetensors.torch import load_file
from text_runs import model_dir as tiny_model_dir
from text_runs import review_rows, write_jsonl
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from aflora_cli import AfloraCallback, AfloraConfig, add_adapters, model_dir
from aflora_cli.engine.manifest import MANIFEST_FILE, WEIGHTS_FILE
from aflora_cli.engine.schedule import frozen_target
from aflora_cli.tasks.tables import SHIPPED_DIR, read_table
from runs import MINILM

CONFIG = AfloraConfig(freezing={"t_i": 2, "t_f": 4})
STEPS, SAVE_EVERY = 16, 8
REVIEWS_DATA = {"task": "movie_reviews", "max_eval_samples": 32}


def review_dataset(tokenizer: Any, rows: int, max_length: int = 32) -> Dataset:
    table = read_table(SHIPPED_DIR / "movie_reviews" / "train.tsv")
    encoded = tokenizer(table["sentence"][:rows], truncation=True, max_length=max_length)
    return Dataset.from_dict({**encoded, "label": [int(label) for label in table["label"][:rows]]})


def classifier_trainer(
    output_dir: Path,
    *,
    callbacks: list[Any] | None = None,
    seed: int = 5,
    base: str | Path | None = None,
    batch_size: int = 8,
    max_steps: int = STEPS,
) -> Trainer:
    """MiniLM (or `base`) + adapters + head on 64 movie reviews, `max_steps` steps at `batch_size` (per process),
    checkpoints every SAVE_EVERY."""
    torch.manual_seed(seed)
    base = base or model_dir(MINILM)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    add_adapters(model, CONFIG)
    args = TrainingArguments(
        str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=1e-2,
        save_steps=SAVE_EVERY,
        logging_steps=4,
        seed=seed,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=review_dataset(tokenizer, 64),
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=callbacks if callbacks is not None else [AfloraCallback(CONFIG, data=REVIEWS_DATA, max_length=32)],
    )


def sft_trainer(output_dir: Path, train_file: Path, *, seed: int = 5) -> Any:
    """The tiny LLaMA + adapters under TRL's SFTTrainer on prompt/completion rows."""
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(seed)
    base = tiny_model_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    add_adapters(model, CONFIG)
    rows = [json.loads(line) for line in train_file.read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": " " + r["response"]} for r in rows])
    args = SFTConfig(
        str(output_dir),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_length=64,
        save_steps=SAVE_EVERY,
        logging_steps=4,
        seed=seed,
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    data = {
        "task": "custom",
        "format": "prompt_response",
        "metric": "exact_match",
        "train_file": str(train_file),
        "validation_file": str(train_file.with_name("validation.jsonl")),
    }
    callback = AfloraCallback(CONFIG, data=data)
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[callback])


def review_files(folder: Path) -> Path:
    """train.jsonl (64 rows) and validation.jsonl (8 rows) of prompt/response review rows; the train path."""
    write_jsonl(folder / "validation.jsonl", review_rows("validation", 8))
    return write_jsonl(folder / "train.jsonl", review_rows("train", 64))


def manifest(checkpoint: Path) -> dict[str, Any]:
    return dict(json.loads((checkpoint / MANIFEST_FILE).read_text()))


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / WEIGHTS_FILE))


def assert_schedule_followed(saved: dict[str, Any]) -> None:
    """At every step t the log holds exactly floor(r(t)·N) PMs frozen at or before t."""
    log, freezing = saved["freeze_log"], saved["freezing"]
    assert freezing["total_steps"] == STEPS and (freezing["t_i"], freezing["t_f"]) == (2, 4)
    for step in range(saved["step"]):
        frozen = sum(1 for at in log.values() if at is not None and at <= step)
        assert frozen == frozen_target(step, STEPS, 2, 4, len(log)), step


def resume_copy(source: Path, dest: Path, step: int) -> Path:
    """A fresh output_dir holding only `source`'s checkpoint-<step>, to resume from."""
    shutil.copytree(source / f"checkpoint-{step}", dest / f"checkpoint-{step}")
    return dest / f"checkpoint-{step}"
