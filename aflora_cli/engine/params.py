"""Trainable-parameter counts: now, and over a whole run from its freeze log."""

from __future__ import annotations

from collections import Counter
from typing import Any

from torch import nn


def count_trainable(model: nn.Module, head_names: list[str]) -> tuple[int, int]:
    """Unique trainable parameters (without the task head, with it) — the paper counts without."""
    head = set(head_names)
    without = with_head = 0
    for name, param in model.named_parameters():
        if param.requires_grad:
            with_head += param.numel()
            if name not in head:
                without += param.numel()
    return without, with_head


def trainable_timeline(
    start: tuple[int, int], freeze_log: dict[str, int | None], sizes: dict[str, int], total_steps: int
) -> dict[str, Any]:
    """Counts over training, derived from the freeze log.

    `start` holds the counts before any PM froze. The count at step t is what the optimizer updates at t,
    so a PM frozen at step t no longer counts at t. `by_step` lists the steps where the count changes;
    `average` is the mean over steps 0..T-1 (the paper's #Params, head excluded).
    """
    drops: Counter[int] = Counter()
    for name, step in freeze_log.items():
        if step is not None:
            drops[step] += sizes[name]
    without, with_head = start
    by_step = [] if 0 in drops else [{"step": 0, "trainable": without, "trainable_with_head": with_head}]
    for step in sorted(drops):
        without, with_head = without - drops[step], with_head - drops[step]
        by_step.append({"step": step, "trainable": without, "trainable_with_head": with_head})
    ends = [point["step"] for point in by_step[1:]] + [total_steps]
    spans = [end - point["step"] for point, end in zip(by_step, ends)]
    steps = max(total_steps, 1)
    return {
        "start": start[0],
        "start_with_head": start[1],
        "end": without,
        "end_with_head": with_head,
        "average": sum(p["trainable"] * n for p, n in zip(by_step, spans)) / steps,
        "average_with_head": sum(p["trainable_with_head"] * n for p, n in zip(by_step, spans)) / steps,
        "by_step": by_step,
    }
