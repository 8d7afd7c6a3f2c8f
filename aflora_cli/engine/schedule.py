"""The freezing schedule of Eq. 5 as plain arithmetic: no torch, so `aflora inspect --plot` can draw the
schedule a checkpoint followed without loading torch."""

from __future__ import annotations

import math


def freeze_fraction(step: int, total_steps: int, t_i: int, t_f: int, power: float = 3) -> float:
    """r(t) of Eq. 5: 0 before t_i, a ramp to 1 at T - t_f (cubic in the paper; `power` 2 in the authors'
    GSM8K code), 1 after."""
    if step < t_i:
        return 0.0
    end = total_steps - t_f
    if step >= end:
        return 1.0
    return 1.0 - (1.0 - (step - t_i) / (end - t_i)) ** power


def frozen_target(step: int, total_steps: int, t_i: int, t_f: int, units: int, power: float = 3) -> int:
    """How many of `units` freezable units are frozen at `step`: floor(r(t)·N)."""
    return math.floor(freeze_fraction(step, total_steps, t_i, t_f, power) * units)
