"""Two CPU processes under torchrun (gloo) freeze the same matrices at the same steps as one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from aflora_cli.engine.base_model import resolve_model_dir
from aflora_cli.engine.manifest import MANIFEST_FILE, WEIGHTS_FILE
from runs import MINILM, quick_recipe, write_recipe


def _tiny_bert_dir(path: Path) -> Path:
    """A small BERT without dropout, so one and two processes see the same function."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(MINILM))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train(recipe: Path, processes: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if processes == 1:
        command = [sys.executable, "-m", "aflora_cli", "train", str(recipe)]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(processes),
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
            "-m", "aflora_cli", "train", str(recipe),
        ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


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
