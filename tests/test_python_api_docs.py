"""The "Use from Python" scripts of docs/python-api.md run as written (Trainer on MiniLM, TRL SFTTrainer on
SmolLM2), the commands take the checkpoints they leave, and two runs of the Trainer script leave the same
checkpoint."""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import ROOT
from doc_examples import example, run_shell

from aflora_cli.commands.inspection import inspect_checkpoint
from aflora_cli.engine.schedule import frozen_target

SCRIPTS = ("python-trainer", "python-trl")


def _scripts() -> list[str]:
    return [example(name).text for name in SCRIPTS]


def test_the_page_has_a_trainer_and_an_sft_script() -> None:
    scripts = _scripts()
    assert "Trainer(" in scripts[0] and "SFTTrainer(" in scripts[1]


def _run_script(number: int, folder: Path) -> Path:
    """Run the page's script `number` as written, in `folder`; the folder back."""
    script = folder / "script.py"
    script.write_text(_scripts()[number], encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=folder, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


@functools.cache
def _ran(number: int) -> Path:
    """The folder of one run of script `number`, shared by the tests that read it."""
    folder = Path(tempfile.mkdtemp(prefix=f"aflora-readme-{number}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return _run_script(number, folder)


@pytest.mark.parametrize(
    ("number", "run_dir", "steps"),
    [(0, "runs/trainer-reviews", 20), pytest.param(1, "runs/sft-reviews", 12, marks=pytest.mark.slow)],
)
def test_readme_script_trains_and_leaves_checkpoints_the_commands_read(number: int, run_dir: str, steps: int) -> None:
    checkpoint = _ran(number) / run_dir / f"checkpoint-{steps}"
    report = inspect_checkpoint(checkpoint)
    assert report["step"] == steps
    manifest = json.loads((checkpoint / "adapter_config.json").read_text())
    log, freezing = manifest["freeze_log"], manifest["freezing"]
    assert freezing["total_steps"] == steps
    for step in range(steps):
        frozen = sum(1 for at in log.values() if at is not None and at <= step)
        assert frozen == frozen_target(step, steps, freezing["t_i"], freezing["t_f"], len(log))
    assert all(at is not None for at in log.values())


@pytest.mark.slow  # a minute: the script's two full runs; CI runs it once above and checks what it leaves
def test_the_trainer_script_run_twice_writes_the_same_checkpoint(tmp_path: Path) -> None:
    """The script seeds before it builds the model, so the head, the adapters, the freeze log and every weight
    are the same bytes in a second run. (The tokenizer's own file is left out: a fast tokenizer saves the
    truncation setting of its last call, which a second run's cached `datasets.map` never makes.)"""
    first = _ran(0) / "runs/trainer-reviews/checkpoint-20"
    second = _run_script(0, tmp_path) / "runs/trainer-reviews/checkpoint-20"
    names = sorted(path.name for path in first.iterdir() if path.name != "tokenizer.json")
    assert {"adapter_model.safetensors", "adapter_config.json", "aflora_freezer.pt", "model.safetensors"} <= set(names)
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_the_commands_take_the_trainer_scripts_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """The page's commands on the Trainer's `checkpoint-20`, run in the script's folder; `aflora merge`'s output goes
    beside the run (no substitution)."""
    folder = _ran(0)
    monkeypatch.chdir(folder)
    inspected, evaluated, merged = run_shell(example("trainer-checkpoint-commands").text, [])
    assert "checkpoint-20" in inspected or "20" in inspected
    assert "accuracy" in evaluated and "merged-reviews" in merged
    assert (folder / "run.png").read_bytes().startswith(b"\x89PNG")
    assert (folder / "merged-reviews" / "config.json").is_file()
