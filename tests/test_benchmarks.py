"""The benchmark scripts' smoke modes: they run end to end on tiny sizes and print their tables.

Nothing here asserts a time or a score: the full runs are for people (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def test_speed_help() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "speed.py"), "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "--smoke" in result.stdout


def test_whole_process_peft_loop_trains_on_the_rows_aflora_trains_on(tmp_path: Path) -> None:
    """The comparison is fair only if B's rows are A's: the quickstart's subset, as aflora's loader draws it."""
    import yaml
    from transformers import AutoTokenizer

    sys.path.insert(0, str(BENCHMARKS))
    from whole_process import QUICKSTART, _read, make_plan

    from aflora_cli.recipe import DataConfig
    from aflora_cli.tasks.classification import load_task_data

    plan = make_plan(120, tmp_path, lean=True)
    recipe = yaml.safe_load(QUICKSTART.read_text())
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


def test_the_shared_helpers_time_a_whole_offline_aflora_train_with_overrides(tmp_path: Path) -> None:
    """benchmarks/common.py's command (used by startup, faults and whole_process) is one `aflora
    train` whose `--set`s land in the run; its /proc readers give this process's resident size."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from common import QUICKSTART, read_jsonl, status_kib, timed, train_command
    finally:
        sys.path.remove(str(BENCHMARKS))
    out = tmp_path / "run"
    overrides = ("training.max_steps=2", "data.max_train_samples=64", "data.max_eval_samples=16")
    seconds = timed(train_command(QUICKSTART, out, *overrides), stderr=None)
    manifest = json.loads((out / "last" / "adapter_config.json").read_text())
    assert seconds > 0 and manifest["step"] == 2
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r][-1] == 2
    rss, peak = status_kib("VmRSS"), status_kib("VmHWM")
    assert rss is not None and peak is not None and 0 < rss <= peak
    assert status_kib("NoSuchField") is None
