"""Run by tests/test_distributed.py under torchrun: the Hugging Face Trainer with AfloraCallback on two CPU
processes (gloo). Each rank writes what it froze, when, and its trained weights to <out>/rank<R>.pt."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from hf_runs import CONFIG, REVIEWS_DATA, classifier_trainer
from transformers import TrainerCallback

from aflora_cli import AfloraCallback


class FrozenAfterEachStep(TrainerCallback):
    """How many PMs this rank's freezer holds frozen after every optimizer step."""

    def __init__(self, aflora: AfloraCallback) -> None:
        self.aflora = aflora
        self.counts: list[int] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.aflora.freezer is not None
        self.counts.append(self.aflora.freezer.num_frozen)


def main(model_dir: str, out: Path) -> None:
    aflora = AfloraCallback(CONFIG, data=REVIEWS_DATA, max_length=32)
    recorder = FrozenAfterEachStep(aflora)
    trainer = classifier_trainer(out, callbacks=[aflora, recorder], seed=0, base=model_dir, batch_size=4)
    model = trainer.model
    trainer.train()
    assert aflora.freezer is not None
    trained = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
    projections = {name: param.detach().clone() for name, param in model.named_parameters() if "lora_" in name}
    record = {
        "world_size": trainer.args.world_size,
        "freeze_log": dict(aflora.freezer.freeze_log),
        "counts": recorder.counts,
        "trained": trained,
        "lora": projections,
    }
    torch.save(record, out / f"rank{os.environ['RANK']}.pt")
    # The Trainer leaves its gloo group open; tearing it down at interpreter exit can abort a rank
    # ("terminate called without an active exception"), so close it while both ranks are alive.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
