"""The benchmark scripts' smoke modes: they run end to end on tiny sizes and print their tables.

Nothing here asserts a time or a score: the full runs are for people (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--smoke", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_speed_smoke_prints_the_table(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    result = _run("speed.py", "--json", str(out))
    text = result.stdout
    for label in (
        "floor",
        "AFLoRA r=4, PMs trainable",
        "AFLoRA r=4, all PMs frozen",
        "PEFT LoRA r=8",
        "PEFT VeRA r=1024",
    ):
        assert label in text
    assert "freezer update <= 2 % of an AFLoRA step" in text
    data = json.loads(out.read_text())
    timing = next(iter(data["shapes"].values()))["timing"]
    assert set(timing) == {"floor", "aflora_before", "aflora_frozen", "lora", "elora", "peft_lora", "peft_vera"}
    assert all(t["median_s"] > 0 for t in timing.values())
    assert timing["aflora_frozen"]["trainable"] < timing["aflora_before"]["trainable"]


def test_speed_times_the_fused_node_against_the_separate_path_under_bf16_autocast(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    result = _run("speed.py", "--precision", "bf16", "--methods", "aflora_before,aflora_fused", "--json", str(out))
    assert "the half-precision fix (separate low-rank path) costs x" in result.stdout
    data = json.loads(out.read_text())
    assert data["settings"] == {"base_dtype": "fp32", "precision": "bf16"}
    ratios = next(iter(data["shapes"].values()))["ratios"]
    assert ratios["aflora_before_over_aflora_fused"] > 0


def test_speed_quickstart_shape_steps_through_the_quickstarts_own_batches() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from speed import make_batches
    finally:
        sys.path.remove(str(BENCHMARKS))
    batches = make_batches("quickstart", vocab=0)
    assert [b["input_ids"].shape[0] for b in batches] == [32] * 93 + [24]  # the quickstart's 3,000 rows
    assert all(b["input_ids"].shape[1] <= 64 for b in batches)
    assert len({b["input_ids"].shape[1] for b in batches}) > 1  # padded to each batch's longest row
    assert set(batches[0]) >= {"input_ids", "attention_mask", "labels"}


def test_replicate_smoke_writes_results_and_resumes(tmp_path: Path) -> None:
    result = _run("replicate.py", "--out", str(tmp_path))
    records = [json.loads(line) for line in (tmp_path / "replicate.jsonl").read_text().splitlines()]
    assert {r["task"] for r in records} == {"movie_reviews", "movie_reviews_rating", "bbc_news"}
    for record in records:
        assert record["steps"] > 0 and record["train_flops"] > 0
        assert 0 < record["trainable_average"] <= record["trainable_start"]
        assert "validation" in record["metrics"] and "test" in record["metrics"]
    assert "The paper's claims on these numbers" in result.stdout
    assert "#### bbc_news" in result.stdout

    again = _run("replicate.py", "--out", str(tmp_path))  # everything is done: nothing reruns
    assert f"{len(records)} already in" in again.stdout
    assert len((tmp_path / "replicate.jsonl").read_text().splitlines()) == len(records)


@pytest.mark.parametrize("script", ["speed.py", "replicate.py"])
def test_help(script: str) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "--smoke" in result.stdout


def test_flop_count_includes_the_thin_paths_in_place_products() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from replicate import count_step_flops
    finally:
        sys.path.remove(str(BENCHMARKS))
    import torch
    from torch import nn

    from aflora_cli.engine.layer import AdapterLinear

    class OneLayer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = AdapterLinear(nn.Linear(24, 40), 4)

        def forward(self, x: torch.Tensor) -> object:
            return type("Out", (), {"loss": self.layer(x).sum()})()

    # 6 rows take the thin path. Forward: W0·x + b 2·6·24·40, A·x 2·6·24·4, accumulation into the output
    # (addmm_) 2·6·4·40; backward: bottleneck gradient 2·4·40·6, A's gradient 2·4·6·24, up's 2·4·6·40.
    expected = 2 * 6 * 24 * 40 + 2 * 6 * 24 * 4 + 2 * 6 * 4 * 40 + 2 * 4 * 40 * 6 + 2 * 4 * 6 * 24 + 2 * 4 * 6 * 40
    assert count_step_flops(OneLayer(), {"x": torch.randn(2, 3, 24)}) == expected


def test_at_scale_smoke_runs_both_phases_and_reports(tmp_path: Path) -> None:
    result = _run("at_scale.py", "--out", str(tmp_path))
    records = [json.loads(line) for line in (tmp_path / "at_scale.jsonl").read_text().splitlines()]
    grid = [r for r in records if r["phase"] == "grid"]
    seeds = [r for r in records if r["phase"] == "seeds"]
    assert len(grid) == 2 * 3 and len(seeds) == 2 * 2  # two methods: three grid values, then two more seeds
    for method in ("aflora", "lora"):
        chosen = {r["lr"] for r in seeds if r["method"] == method}
        best = max(
            (r for r in grid if r["method"] == method),
            key=lambda r: (r["metrics"]["validation"]["accuracy"], -r["lr"]),
        )
        assert chosen == {best["lr"]}  # the extra seeds repeat the value seed 0 chose on validation
    assert "AFLoRA >= LoRA (Table 1)" in result.stdout


def test_stopping_a_benchmark_stops_its_workers(tmp_path: Path) -> None:
    pid_file, results = tmp_path / "worker.pid", tmp_path / "results.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}  # the stopped pool leaves its work folder
    parent = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "orphan_pool_run.py"), str(pid_file), str(results)], env=env
    )
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists() or not pid_file.read_text():
            assert parent.poll() is None and time.monotonic() < deadline, "the worker never started"
            time.sleep(0.2)
        worker = int(pid_file.read_text())
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _alive(worker):
            assert time.monotonic() < deadline, f"worker {worker} outlived its stopped parent"
            time.sleep(0.2)
    finally:
        parent.kill()
    assert not results.exists() or not results.read_text()


def _alive(pid: int) -> bool:
    """Whether `pid` still runs; a zombie (ended, not yet reaped by whoever adopted it) does not."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


def test_at_scale_plans_seeds_first_and_ablations_without_a_grid_at_aflora_value() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from at_scale import LR_GRID, ready_runs
    finally:
        sys.path.remove(str(BENCHMARKS))
    task = "movie_reviews_rating"

    def record(method: str, lr: float, seed: int, pearson: float) -> dict[str, object]:
        return {
            "task": task,
            "method": method,
            "lr": lr,
            "seed": seed,
            "metrics": {"validation": {"pearson": pearson}},
        }

    methods = ["aflora", "lora", "pm_trainable"]
    # AFLoRA's grid is complete (its middle value best), LoRA's is not
    records = [record("aflora", lr, 0, score) for lr, score in zip(LR_GRID, (0.5, 0.7, 0.6), strict=True)]
    records.append(record("lora", LR_GRID[0], 0, 0.9))
    runs = ready_runs(records, [task], methods)
    chosen = LR_GRID[1]
    assert runs == [
        (task, "aflora", chosen, 1),
        (task, "aflora", chosen, 2),
        (task, "pm_trainable", chosen, 0),  # no grid of its own: AFLoRA's value, from seed 0
        (task, "pm_trainable", chosen, 1),
        (task, "pm_trainable", chosen, 2),
        (task, "lora", LR_GRID[1], 0),
        (task, "lora", LR_GRID[2], 0),
    ]
    assert ready_runs(records[:2], [task], ["pm_trainable"]) == []  # waits for AFLoRA's grid


def test_at_scale_probe_names_a_seed_0_run_outside_the_grid() -> None:
    import argparse

    sys.path.insert(0, str(BENCHMARKS))
    try:
        from at_scale import parse_probe
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert parse_probe("movie_reviews_rating:lora:3e-4") == ("movie_reviews_rating", "lora", 3e-4, 0)
    with pytest.raises(argparse.ArgumentTypeError, match="bbc:lora:1e-3: expected TASK:METHOD:LR"):
        parse_probe("bbc:lora:1e-3")


def test_whole_process_peft_loop_trains_on_the_rows_aflora_trains_on(tmp_path: Path) -> None:
    """The comparison is fair only if B's rows are A's: the quickstart's subset, as aflora's loader draws it."""
    import yaml
    from transformers import AutoTokenizer

    sys.path.insert(0, str(BENCHMARKS))
    from whole_process import RECIPE, _read, make_plan

    from aflora_cli.recipe import DataConfig
    from aflora_cli.tasks.classification import load_task_data

    plan = make_plan(120, tmp_path, lean=True)
    recipe = yaml.safe_load(RECIPE.read_text())
    tokenizer = AutoTokenizer.from_pretrained(plan["model_dir"])
    data = load_task_data(DataConfig(**recipe["data"]), tokenizer, plan["max_length"], recipe["seed"], ["train"])
    texts, labels = _read("train")
    ours = tokenizer([texts[i] for i in plan["train_rows"]], truncation=True, max_length=plan["max_length"])
    assert data.train is not None and len(plan["train_rows"]) == len(data.train) == 3000
    assert data.train["input_ids"] == ours["input_ids"]
    assert data.train["labels"] == [labels[i] for i in plan["train_rows"]]
    assert (plan["steps"], plan["batch_size"], plan["lr"]) == (120, recipe["training"]["batch_size"], 2e-2)
    # --lean: B scores the 512 rows of each split that A's `max_eval_samples: 512` keeps
    lean = DataConfig(**{**recipe["data"], "max_eval_samples": 512})
    held_out = load_task_data(lean, tokenizer, plan["max_length"], recipe["seed"], ["validation", "test"])
    for split, rows in plan["eval_rows"].items():
        split_labels = _read(split)[1]
        assert len(rows) == 512 and held_out.evaluation[split]["labels"] == [split_labels[i] for i in rows]
