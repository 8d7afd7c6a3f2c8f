"""benchmarks/front.py and plot_front.py: the plan, the report's numbers (worked out by hand from a small raw
file), the plot's points, and a smoke run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from front import FULL, LR_GRID, SMOKE, Runs, report  # noqa: E402
from plot_front import draw, front_data  # noqa: E402

TASK = "movie_reviews"


def rec(method: str, lr: float, seed: int, val: float, test: float, trainable: float, **extra: Any) -> dict[str, Any]:
    return {
        "task": TASK,
        "method": method,
        "lr": lr,
        "seed": seed,
        "scale": FULL,
        "metrics": {"validation": {"accuracy": val}, "test": {"accuracy": test}},
        "trainable_average": trainable,
        "train_time_s": 600.0,
        "machine": {"torch_threads": 1},
        **extra,
    }


def write_raw(folder: Path) -> Runs:
    at_scale = [
        # AFLoRA r=4: 3e-3 best on validation; seeds 0-2 there
        rec("aflora", 1e-3, 0, 0.70, 0.70, 50000),
        rec("aflora", 3e-3, 0, 0.80, 0.81, 48000),
        rec("aflora", 1e-2, 0, 0.75, 0.75, 50000),
        rec("aflora", 3e-3, 1, 0.81, 0.84, 47000),
        rec("aflora", 3e-3, 2, 0.79, 0.82, 46000),
        # LoRA r=8: 3e-3
        rec("lora", 1e-3, 0, 0.82, 0.82, 331776),
        rec("lora", 3e-3, 0, 0.85, 0.85, 331776),
        rec("lora", 1e-2, 0, 0.50, 0.50, 331776),
        rec("lora", 3e-3, 1, 0.84, 0.84, 331776),
        rec("lora", 3e-3, 2, 0.86, 0.86, 331776),
    ]

    def new(method: str, lr: float, seed: int, val: float, test: float, trainable: float, head_lr: float | None = None):
        return rec(method, lr, seed, val, test, trainable, head_lr=lr if head_lr is None else head_lr)

    front = [
        # LoRA r=1: complete at 1e-2 (the grid's edge, so it grew to 3e-2, which did worse)
        new("lora_r1", 1e-3, 0, 0.78, 0.78, 41472),
        new("lora_r1", 3e-3, 0, 0.79, 0.79, 41472),
        new("lora_r1", 1e-2, 0, 0.80, 0.80, 41472),
        new("lora_r1", 3e-2, 0, 0.70, 0.70, 41472),
        new("lora_r1", 1e-2, 1, 0.81, 0.82, 41472),
        new("lora_r1", 1e-2, 2, 0.80, 0.83, 41472),
        # AFLoRA r=8: grid done (3e-3), seed 2 missing
        new("aflora_r8", 1e-3, 0, 0.83, 0.83, 95000),
        new("aflora_r8", 3e-3, 0, 0.86, 0.84, 91000),
        new("aflora_r8", 1e-2, 0, 0.84, 0.84, 95000),
        new("aflora_r8", 3e-3, 1, 0.85, 0.85, 89000),
        # LoRA r=8 with adaptive PMs: one grid run
        new("lora_adaptive_r8", 1e-3, 0, 0.60, 0.60, 120000),
        # head-rate grid at AFLoRA's 3e-3: 3e-4 here, 3e-3 is at_scale.py's run
        {**new("aflora_head_lr", 3e-3, 0, 0.81, 0.80, 45000, head_lr=3e-4), "machine": {"torch_threads": 2}},
        # a run of another scale counts for nothing
        {**new("lora_r2", 1e-3, 0, 0.9, 0.9, 82944), "scale": SMOKE},
    ]
    folder.mkdir(parents=True, exist_ok=True)
    for name, records in (("at_scale.jsonl", at_scale), ("front.jsonl", front)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return Runs.from_folder(folder, FULL)


def test_plan_goes_in_priority_order_grid_then_seeds(tmp_path: Path) -> None:
    runs = write_raw(tmp_path)
    from front import PRIORITY

    assert runs.plan([TASK], list(PRIORITY)) == [
        (TASK, "lora_adaptive_r8", 3e-3, 3e-3, 0),
        (TASK, "lora_adaptive_r8", 1e-2, 1e-2, 0),
        (TASK, "aflora_r8", 3e-3, 3e-3, 2),
        (TASK, "lora_r2", 1e-3, 1e-3, 0),  # the smoke-scale run does not count
        (TASK, "lora_r2", 3e-3, 3e-3, 0),
        (TASK, "lora_r2", 1e-2, 1e-2, 0),
        (TASK, "lora_adaptive_r4", 1e-3, 1e-3, 0),
        (TASK, "lora_adaptive_r4", 3e-3, 3e-3, 0),
        (TASK, "lora_adaptive_r4", 1e-2, 1e-2, 0),
        (TASK, "aflora_r16", 1e-3, 1e-3, 0),
        (TASK, "aflora_r16", 3e-3, 3e-3, 0),
        (TASK, "aflora_r16", 1e-2, 1e-2, 0),
        (TASK, "aflora_r4_attn_adaptive", 1e-3, 1e-3, 0),
        (TASK, "aflora_r4_attn_adaptive", 3e-3, 3e-3, 0),
        (TASK, "aflora_r4_attn_adaptive", 1e-2, 1e-2, 0),
        (TASK, "aflora_head_lr", 3e-3, 9e-4, 0),  # 3e-4 done here, 3e-3 by at_scale.py
        (TASK, "aflora_head_lr", 3e-3, 9e-3, 0),
    ]
    assert runs.plan([TASK], ["aflora_r8", "lora_r1"]) == [(TASK, "aflora_r8", 3e-3, 3e-3, 2)]
    # the head-rate grid waits for at_scale.py's AFLoRA grid
    bare = Runs([], [], FULL)
    assert [k for k in bare.plan([TASK], ["aflora_head_lr", "lora_r1"])] == [
        (TASK, "lora_r1", lr, lr, 0) for lr in (1e-3, 3e-3, 1e-2)
    ]


def test_a_grid_grows_one_ladder_step_past_the_edge_that_holds_its_best_until_the_best_is_inside() -> None:
    def seed0(method: str, grid: dict[float, float]) -> list[dict[str, Any]]:
        return [rec(method, lr, 0, val, val, 1000, head_lr=lr) for lr, val in grid.items()]

    upper = seed0("aflora_r16", {1e-3: 0.70, 3e-3: 0.75, 1e-2: 0.80})
    runs = Runs(upper, [], FULL)
    assert runs.grid(TASK, "aflora_r16") == [(lr, lr) for lr in (1e-3, 3e-3, 1e-2, 3e-2)]
    assert runs.chosen(TASK, "aflora_r16") is None
    assert runs.plan([TASK], ["aflora_r16"]) == [(TASK, "aflora_r16", 3e-2, 3e-2, 0)]
    # the new step wins, but the ladder ends there: chosen, and the seeds run at it
    runs = Runs(upper + seed0("aflora_r16", {3e-2: 0.82}), [], FULL)
    assert runs.chosen(TASK, "aflora_r16") == (3e-2, 3e-2)
    assert runs.plan([TASK], ["aflora_r16"]) == [(TASK, "aflora_r16", 3e-2, 3e-2, s) for s in (1, 2)]

    lower = seed0("lora_adaptive_r4", {1e-3: 0.80, 3e-3: 0.75, 1e-2: 0.50})
    assert Runs(lower, [], FULL).plan([TASK], ["lora_adaptive_r4"]) == [(TASK, "lora_adaptive_r4", 3e-4, 3e-4, 0)]
    runs = Runs(lower + seed0("lora_adaptive_r4", {3e-4: 0.79}), [], FULL)
    assert runs.chosen(TASK, "lora_adaptive_r4") == (1e-3, 1e-3)  # inside now: the grid stops growing
    assert runs.grid(TASK, "lora_adaptive_r4") == [(lr, lr) for lr in (3e-4, 1e-3, 3e-3, 1e-2)]

    # at_scale.py's AFLoRA r=4 grows too (its new run goes in front.jsonl), and the head-rate grid follows its
    # choice; with the ladder at LR_GRID (the smoke scale) no grid grows
    at_scale = [rec("aflora", lr, 0, val, val, 47000) for lr, val in {1e-3: 0.7, 3e-3: 0.75, 1e-2: 0.8}.items()]
    assert Runs([], at_scale, FULL).plan([TASK], ["aflora", "aflora_head_lr"]) == [(TASK, "aflora", 3e-2, 3e-2, 0)]
    grown = Runs([rec("aflora", 3e-2, 0, 0.81, 0.81, 47000, head_lr=3e-2)], at_scale, FULL)
    assert grown.chosen(TASK, "aflora_head_lr") is None  # its grid: 3e-3, 9e-3, 3e-2 (done), 9e-2
    assert grown.plan([TASK], ["aflora_head_lr"]) == [(TASK, "aflora_head_lr", 3e-2, h, 0) for h in (3e-3, 9e-3, 9e-2)]
    assert Runs([], at_scale, FULL, ladder=LR_GRID).chosen(TASK, "aflora") == (1e-2, 1e-2)


def test_report_numbers_from_a_small_raw_file(tmp_path: Path) -> None:
    text = report(write_raw(tmp_path), [TASK])
    rows = text.splitlines()
    # grids on validation
    assert "| lr 0.001 | lr 0.003 | lr 0.01 | lr 0.03 | chosen |" in text  # the grids' union of rates
    assert "| LoRA r=1 | 0.7800 | 0.7900 | 0.8000 | 0.7000 | 0.01 |" in rows
    assert "| LoRA r=8, every PM adaptive | 0.6000 | — | — | — | — |" in rows
    assert "| AFLoRA r=4, head rate tuned | 0.8100 | — | 0.8000 | — | — |" in rows
    # the front: sorted by average trainable count; incomplete settings say so
    front = [r for r in rows if r.startswith("| ") and r.endswith("|") and r.count("|") == 9][1:]
    assert front[:6] == [
        "| LoRA r=1 | 0.01 | 0.01 | 3 | 0.8167 ± 0.0153 | 0.8033 ± 0.0058 | 41,472 | complete |",
        "| AFLoRA r=4, head rate tuned | — | — | 0 | — | — | 46,500 | incomplete: grid 2 of 4 |",
        "| AFLoRA r=4 | 0.003 | 0.003 | 3 | 0.8233 ± 0.0153 | 0.8000 ± 0.0100 | 47,000 | complete |",
        "| AFLoRA r=8 | 0.003 | 0.003 | 2 | 0.8450 ± 0.0071 | 0.8550 ± 0.0071 | 90,000 | incomplete: seeds 0, 1 of 3 |",
        "| LoRA r=8, every PM adaptive | — | — | 0 | — | — | 120,000 | incomplete: grid 1 of 3 |",
        "| LoRA r=8 | 0.003 | 0.003 | 3 | 0.8500 ± 0.0100 | 0.8500 ± 0.0100 | 331,776 | complete |",
    ]
    assert "| AFLoRA r=4, FFN PMs trainable throughout | — | — | 0 | — | — | — | not run |" in rows
    # verdicts: AFLoRA r=4 - LoRA r=1 per seed = +0.01, +0.02, -0.01; AFLoRA r=4 - LoRA r=8 = -0.04, 0, -0.04
    assert (
        "| AFLoRA r=4 >= LoRA r=1 (about the same count) | 47,000 vs 41,472 | +0.0100, +0.0200, -0.0100 | "
        "+0.0067 ± 0.0153 | within noise |"
    ) in rows
    assert (
        "| AFLoRA r=4 (best AFLoRA-family validation under LoRA r=8's count; 4 candidates incomplete) >= LoRA r=8 "
        "| 47,000 vs 331,776 | -0.0400, +0.0000, -0.0400 | -0.0267 ± 0.0231 | within noise |"
    ) in rows
    assert "incomplete, not considered: AFLoRA r=8; AFLoRA r=16; AFLoRA r=4, attention PMs adaptive too; " in text
    # front.jsonl's 12 runs of this scale: 11 x 600 s on one thread + 600 s on two = 7,800 CPU-seconds
    assert "| runs of movie_reviews in front.jsonl | training CPU-hours (train time x torch threads) |" in rows
    assert "| 12 | 2.2 |" in rows


def test_incomplete_settings_are_never_judged(tmp_path: Path) -> None:
    runs = write_raw(tmp_path)
    runs.by_key = {k: r for k, r in runs.by_key.items() if k[1:] != ("lora_r1", 1e-2, 1e-2, 2)}
    text = report(runs, [TASK])
    assert "| AFLoRA r=4 >= LoRA r=1 (about the same count) | 47,000 vs 41,472 | — | — | " in text
    assert "not judged: LoRA r=1 incomplete |" in text


def test_plot_draws_complete_settings_and_seed_0_points_apart(tmp_path: Path) -> None:
    data = front_data(write_raw(tmp_path), TASK)
    lora, aflora, adaptive = data["lines"].values()
    assert [(p["rank"], p["complete"], p["seeds"]) for p in lora] == [(1, True, 3), (8, True, 3)]
    assert [(p["rank"], p["complete"], p["seeds"]) for p in aflora] == [(4, True, 3), (8, False, 1)]
    assert aflora[1]["mean"] == 0.84 and aflora[1]["std"] == 0.0  # seed 0's test at the chosen value
    assert adaptive == [] and data["singles"] == []  # no choice yet: not drawn
    assert aflora[0]["mean"] == pytest.approx(0.82333, abs=1e-5) and aflora[0]["trainable"] == 47000
    draw(data, tmp_path / "front.png")
    assert (tmp_path / "front.png").read_bytes()[:4] == b"\x89PNG"


def test_smoke_run_writes_one_line_per_run_with_the_fields_and_resumes(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(BENCHMARKS / "front.py"), "--smoke", "--out", str(tmp_path), "--threads", "1"]
    command += ["--only", "lora_adaptive_r4"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "front.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["seed"]) for r in records] == [("grid", 0)] * 3 + [("seeds", 1), ("seeds", 2)]
    at_scale_fields = {"task", "method", "lr", "seed", "phase", "scale", "commit", "machine", "metrics", "steps"}
    at_scale_fields |= {"t_i", "t_f", "trainable_average", "trainable_start", "trainable_end", "frozen_pms"}
    at_scale_fields |= {"num_units", "train_time_s"}
    for r in records:
        assert set(r) == at_scale_fields | {"head_lr", "adapter"}
        assert r["method"] == "lora_adaptive_r4" and r["head_lr"] == r["lr"] and r["scale"] == SMOKE
        assert r["adapter"] == {"method": "lora", "rank": 4, "policy": {"attention": "adaptive", "ffn": "adaptive"}}
        # every PM (6 layers x 6 linear types x A, B) froze on the schedule: only the head trains at the end
        assert r["num_units"] == r["frozen_pms"] == 72 and r["trainable_end"] == 0
        assert 0 < r["trainable_average"] < r["trainable_start"] == 6 * 6912 * 4
        assert r["machine"]["torch_threads"] == 1
    front = [line for line in result.stdout.splitlines() if line.endswith("| complete |")]
    assert len(front) == 1 and front[0].startswith("| LoRA r=4, every PM adaptive | ")

    again = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len((tmp_path / "front.jsonl").read_text().splitlines()) == len(records)  # nothing ran again
