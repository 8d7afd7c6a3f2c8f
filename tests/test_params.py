"""Trainable-parameter counts over a run, derived from a hand-made freeze log."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aflora_cli.engine.params import count_trainable, trainable_timeline

SIZES = {"a": 10, "b": 20, "c": 40, "d": 80}
START = (1000, 1050)  # adapters only, adapters + a 50-parameter head


def test_timeline_change_points_and_average():
    log = {"a": 3, "b": 3, "c": 7, "d": None}
    out = trainable_timeline(START, log, SIZES, total_steps=10)
    assert out["by_step"] == [
        {"step": 0, "trainable": 1000, "trainable_with_head": 1050},
        {"step": 3, "trainable": 970, "trainable_with_head": 1020},
        {"step": 7, "trainable": 930, "trainable_with_head": 980},
    ]
    # steps 0-2 count 1000, 3-6 count 970 (a and b no longer count at step 3), 7-9 count 930
    assert out["average"] == pytest.approx((3 * 1000 + 4 * 970 + 3 * 930) / 10)
    assert out["average_with_head"] == pytest.approx((3 * 1050 + 4 * 1020 + 3 * 980) / 10)
    assert (out["start"], out["start_with_head"]) == START
    assert (out["end"], out["end_with_head"]) == (930, 980)


def test_timeline_without_freezing_is_flat():
    out = trainable_timeline(START, {name: None for name in SIZES}, SIZES, total_steps=8)
    assert out["by_step"] == [{"step": 0, "trainable": 1000, "trainable_with_head": 1050}]
    assert out["average"] == 1000 and out["average_with_head"] == 1050
    assert out["end"] == 1000


def test_timeline_freeze_at_step_zero_replaces_the_start_point():
    out = trainable_timeline(START, {"a": 0, "b": None, "c": 5, "d": 5}, SIZES, total_steps=10)
    assert out["by_step"] == [
        {"step": 0, "trainable": 990, "trainable_with_head": 1040},
        {"step": 5, "trainable": 870, "trainable_with_head": 920},
    ]
    assert out["average"] == pytest.approx((5 * 990 + 5 * 870) / 10)


def test_timeline_freeze_at_last_step_counts_once():
    # all four freeze at T - 1 = 4: steps 0-3 count 1000, step 4 counts 850
    out = trainable_timeline(START, {"a": 4, "b": 4, "c": 4, "d": 4}, SIZES, total_steps=5)
    assert out["average"] == pytest.approx((4 * 1000 + 1 * 850) / 5)
    assert out["end"] == 850
    assert out["by_step"][-1] == {"step": 4, "trainable": 850, "trainable_with_head": 900}


def test_timeline_matches_a_step_by_step_count():
    log = {"a": 2, "b": 9, "c": 4, "d": 4}
    total = 12
    per_step = [START[0] - sum(SIZES[n] for n, s in log.items() if s is not None and s <= t) for t in range(total)]
    out = trainable_timeline(START, log, SIZES, total_steps=total)
    assert out["average"] == pytest.approx(sum(per_step) / total)
    changes = [0] + [t for t in range(1, total) if per_step[t] != per_step[t - 1]]
    assert [p["step"] for p in out["by_step"]] == changes
    assert [p["trainable"] for p in out["by_step"]] == [per_step[t] for t in changes]


def test_count_trainable_unique_and_head():
    shared = nn.Parameter(torch.zeros(3, 4))
    model = nn.Module()
    model.a = nn.Linear(4, 3)
    model.b = nn.Linear(4, 3)
    model.b.weight = shared
    model.a.weight = shared  # tied: counted once
    model.head = nn.Linear(3, 2)
    model.frozen = nn.Linear(5, 5).requires_grad_(False)
    head = ["head.weight", "head.bias"]
    assert count_trainable(model, head) == (12 + 3 + 3, 12 + 3 + 3 + 6 + 2)
