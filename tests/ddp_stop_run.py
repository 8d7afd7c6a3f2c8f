"""Under torchrun: `aflora train`'s Trainer where only rank 1 is sent a SIGTERM (during step 3); each rank writes
the step it stopped at to <out>/stopped-<rank> ("none" if it ran to the end)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

from aflora_cli.recipe import load_recipe
from aflora_cli.training.trainer import Trainer, TrainingStopped

trainer = Trainer(load_recipe(Path(sys.argv[1]), None))
trainer.prepare()
rank = trainer.group.rank
if rank == 1:
    optimizer_step = trainer.steps.optimizer_step

    def signalled_step(loss: Any, step: int) -> Any:
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return optimizer_step(loss, step)

    trainer.steps.optimizer_step = signalled_step  # type: ignore[method-assign]
stopped = "none"
try:
    trainer.train()
except TrainingStopped as stop:
    stopped = str(stop.step)
finally:
    trainer.close()
Path(sys.argv[2], f"stopped-{rank}").write_text(stopped, encoding="utf-8")
