"""Run by tests/test_distributed.py under torchrun: the Hugging Face Trainer with AfloraCallback on two CPU
processes (gloo). Each rank writes what it froze, when, and its trained weights to <out>/rank<R>.pt."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from hf_runs import CONFIG, REVIEWS_DATA, SAVE_EVERY, STEPS, review_dataset
from transformers import (
    AutoTokenizer,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from aflora_cli import AfloraCallback, add_adapters


class FrozenAfterEachStep(TrainerCallback):
    """How many PMs this rank's freezer holds frozen after every optimizer step."""

    def __init__(self, aflora: AfloraCallback) -> None:
        self.aflora = aflora
        self.counts: list[int] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.aflora.freezer is not None
        self.counts.append(self.aflora.freezer.num_frozen)


def main(model_dir: str, out: Path) -> None:
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = BertForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    add_adapters(model, CONFIG)
    aflora = AfloraCallback(CONFIG, data=REVIEWS_DATA, max_length=32)
    recorder = FrozenAfterEachStep(aflora)
    args = TrainingArguments(
        str(out),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_steps=SAVE_EVERY,
        seed=0,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        ddp_backend="gloo",
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=review_dataset(tokenizer, 64),
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[aflora, recorder],
    )
    trainer.train()
    assert aflora.freezer is not None
    trained = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
    frozen = {name: param.detach().clone() for name, param in model.named_parameters() if "lora_" in name}
    record = {
        "world_size": args.world_size,
        "freeze_log": dict(aflora.freezer.freeze_log),
        "counts": recorder.counts,
        "trained": trained,
        "lora": frozen,
    }
    torch.save(record, out / f"rank{os.environ['RANK']}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
