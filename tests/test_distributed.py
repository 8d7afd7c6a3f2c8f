"""Two CPU processes under torchrun (gloo): `aflora train` freezes the same matrices at the same steps as one
process, and the Hugging Face Trainer with AfloraCallback freezes alike on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_runs import STEPS, assert_schedule_followed, manifest
from launch import torchrun
from safetensors.torch import load_file

from aflora_cli.engine.manifest import MANIFEST_FILE, WEIGHTS_FILE
from runs import quick_recipe, tiny_bert_dir, write_recipe


def _tiny_bert_dir(path: Path) -> Path:
    """A small BERT without dropout, so one and two processes see the same function."""
    return tiny_bert_dir(path, intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _train(recipe: Path, processes: int) -> None:
    if processes == 1:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        command = [sys.executable, "-m", "aflora_cli", "train", str(recipe)]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        torchrun(processes, ["-m", "aflora_cli", "train", str(recipe)])


def test_two_processes_freeze_like_one(tmp_path: Path) -> None:
    model_dir = _tiny_bert_dir(tmp_path / "tiny-bert")
    settings = {
        "model": {"name_or_path": str(model_dir)},
        "freezing": {"t_i": 2, "t_f": 4},
        "data": {"max_train_samples": 64, "max_eval_samples": 32},
    }
    one = quick_recipe(tmp_path / "one", training={"max_steps": 12, "batch_size": 8, "lr": 1e-2}, **settings)
    two = quick_recipe(tmp_path / "two", training={"max_steps": 12, "batch_size": 4, "lr": 1e-2}, **settings)
    _train(write_recipe(tmp_path / "one.yaml", one), processes=1)
    _train(write_recipe(tmp_path / "two.yaml", two), processes=2)

    manifests = [json.loads((tmp_path / run / "last" / MANIFEST_FILE).read_text()) for run in ("one", "two")]
    log_one, log_two = manifests[0]["freeze_log"], manifests[1]["freeze_log"]
    assert len(log_one) == 8 and all(step is not None for step in log_one.values())
    assert log_two == log_one
    assert manifests[0]["freezing"]["total_steps"] == manifests[1]["freezing"]["total_steps"] == 12
    # the same global batches: DDP's averaged gradients give (nearly) the same adapter
    weights = [load_file(str(tmp_path / run / "last" / WEIGHTS_FILE)) for run in ("one", "two")]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_trainer_callback_under_two_processes_freezes_alike_on_every_rank(tmp_path: Path) -> None:
    model_dir = _tiny_bert_dir(tmp_path / "tiny-bert")
    out = tmp_path / "run"
    torchrun(2, [str(Path(__file__).with_name("hf_ddp_run.py")), str(model_dir), str(out)])

    ranks = [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    # scores come from the gradients DDP has averaged: every rank freezes the same PMs at the same steps
    assert ranks[0]["freeze_log"] == ranks[1]["freeze_log"]
    assert ranks[0]["counts"] == ranks[1]["counts"]
    num_pms = len(ranks[0]["freeze_log"])
    assert ranks[0]["counts"][-1] == num_pms == 8  # 2 layers x 2 FFN linears x (A, B)
    for name, tensor in ranks[0]["trained"].items():  # the vectors and head stay in sync
        assert torch.equal(ranks[1]["trained"][name], tensor), name
    assert not any("lora_" in name for name in ranks[0]["trained"])  # every PM ended frozen
    for name, tensor in ranks[0]["lora"].items():
        assert torch.equal(ranks[1]["lora"][name], tensor), name

    saved = manifest(out / f"checkpoint-{STEPS}")  # written once, by rank 0
    assert saved["freeze_log"] == ranks[0]["freeze_log"]
    assert_schedule_followed(saved)
    weights = load_file(str(out / f"checkpoint-{STEPS}" / WEIGHTS_FILE))
    for name, tensor in ranks[0]["lora"].items():
        key = next(key for key in weights if key.endswith(name.split("bert.", 1)[-1]))
        assert torch.equal(weights[key], tensor), name


# bf16 runs in CI; the NF4 pair (40 s, two processes each quantizing the base) with `-m slow`
@pytest.mark.parametrize("storage", ["bf16", pytest.param("nf4", marks=pytest.mark.slow)])
def test_two_processes_train_over_a_half_precision_or_4bit_base(tmp_path: Path, storage: str) -> None:
    """DDP over a base stored in bf16 or NF4: both ranks train the fp32 adapters, the schedule freezes every
    PM and the checkpoint records the storage. The result is close to one process on the same global batches
    (not equal: each rank averages its own rows' token losses)."""
    pytest.importorskip("bitsandbytes")
    from text_runs import lm_recipe, review_files

    files = review_files(tmp_path / "data", train=32, validation=6)
    model = {"bf16": {"dtype": "bf16"}, "nf4": {"quantization": {"bits": 4}}}[storage]
    runs = {}
    for processes, batch in ((1, 8), (2, 4)):
        raw = lm_recipe(
            tmp_path / f"p{processes}",
            "llama-64",
            files,
            training={"max_steps": 6, "batch_size": batch, "max_length": 64, "lr": 1e-2},
            freezing={"t_i": 1, "t_f": 2},
        )
        raw["model"].update(model)
        _train(write_recipe(tmp_path / f"p{processes}.yaml", raw), processes)
        runs[processes] = tmp_path / f"p{processes}" / "last"
    saved = {p: json.loads((folder / MANIFEST_FILE).read_text()) for p, folder in runs.items()}
    base = saved[2]["base_model"]
    expected = ("bf16", False) if storage == "bf16" else ("fp32", True)
    assert (base["dtype"], base["quantization"] is not None) == expected
    assert all(step is not None for step in saved[2]["freeze_log"].values())
    weights = {p: load_file(str(folder / WEIGHTS_FILE)) for p, folder in runs.items()}
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights[2].values())
    lambda_b = [name for name in weights[2] if "lambda_b" in name]
    assert lambda_b and all(weights[2][name].abs().sum() > 0 for name in lambda_b)  # Λb left zero: it trained
    for name, tensor in weights[1].items():
        torch.testing.assert_close(weights[2][name], tensor, rtol=0.05, atol=2e-3, msg=name)


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    """Only rank 1 gets the SIGTERM: the stop flag all-reduced at every step stops both ranks after step 3, with
    `last` saved there; `--resume` on two processes then runs to the end."""
    model_dir = _tiny_bert_dir(tmp_path / "tiny-bert")
    raw = quick_recipe(
        tmp_path / "run",
        model={"name_or_path": str(model_dir)},
        data={"max_train_samples": 32, "max_eval_samples": 8},
        training={"max_steps": 8, "batch_size": 4, "save_every": 6},
    )
    recipe = write_recipe(tmp_path / "run.yaml", raw)
    torchrun(2, [str(Path(__file__).with_name("ddp_stop_run.py")), str(recipe), str(tmp_path)])
    assert [(tmp_path / f"stopped-{rank}").read_text() for rank in (0, 1)] == ["3", "3"]
    assert json.loads((tmp_path / "run" / "last" / MANIFEST_FILE).read_text())["step"] == 3
    torchrun(2, ["-m", "aflora_cli", "train", str(recipe), "--resume"])
    assert json.loads((tmp_path / "run" / "last" / MANIFEST_FILE).read_text())["step"] == 8
