"""The README's "Use from Python" scripts run as written (Trainer on MiniLM, TRL SFTTrainer on SmolLM2), and
the commands take the checkpoints they leave."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from aflora_cli.commands.inspection import inspect_checkpoint
from aflora_cli.engine.freezing import frozen_target

SECTION = "## Use from Python"


def _scripts() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index(SECTION) :]
    section = section[: section.index("\n## ", len(SECTION))]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_the_section_has_a_trainer_and_an_sft_script() -> None:
    scripts = _scripts()
    assert len(scripts) == 2
    assert "Trainer(" in scripts[0] and "SFTTrainer(" in scripts[1]


@pytest.mark.parametrize(
    ("number", "run_dir", "steps"),
    [(0, "runs/trainer-reviews", 40), pytest.param(1, "runs/sft-reviews", 12, marks=pytest.mark.slow)],
)
def test_readme_script_trains_and_leaves_checkpoints_the_commands_read(
    number: int, run_dir: str, steps: int, tmp_path: Path
) -> None:
    script = tmp_path / "script.py"
    script.write_text(_scripts()[number], encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / run_dir / f"checkpoint-{steps}"
    report = inspect_checkpoint(checkpoint)
    assert report["step"] == steps
    manifest = json.loads((checkpoint / "adapter_config.json").read_text())
    log, freezing = manifest["freeze_log"], manifest["freezing"]
    assert freezing["total_steps"] == steps
    for step in range(steps):
        frozen = sum(1 for at in log.values() if at is not None and at <= step)
        assert frozen == frozen_target(step, steps, freezing["t_i"], freezing["t_f"], len(log))
    assert all(at is not None for at in log.values())
