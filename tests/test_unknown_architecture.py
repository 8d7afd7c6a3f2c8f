"""A model type without default targets: the one-line error lists its linear layers and a guessed
`adapter.targets` block, and that block, pasted into a recipe, trains."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer, MPNetConfig
from typer.testing import CliRunner

from aflora_cli.cli import app
from aflora_cli.engine.base_model import resolve_model_dir
from aflora_cli.engine.config import AdapterConfig
from aflora_cli.engine.inject import PASTE_MARKER, adapter_modules, find_targets, guess_kind
from aflora_cli.errors import AfloraError
from aflora_cli.training.trainer import Trainer
from runs import MINILM, quick_recipe, recipe_of, write_recipe

SUFFIXES = {  # MPNet's layer: name within the block -> (guessed kind, out×in)
    "attention.attn.q": ("attention", "32×32"),
    "attention.attn.k": ("attention", "32×32"),
    "attention.attn.v": ("attention", "32×32"),
    "attention.attn.o": ("attention", "32×32"),
    "intermediate.dense": ("ffn", "48×32"),
    "output.dense": ("ffn", "32×48"),
}


def _tiny_mpnet(vocab_size: int, pad_token_id: int = 1) -> torch.nn.Module:
    config = MPNetConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        vocab_size=vocab_size,
        pad_token_id=pad_token_id,
    )
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config)


def _error(model: torch.nn.Module) -> str:
    with pytest.raises(AfloraError) as info:
        find_targets(model, AdapterConfig())
    return str(info.value)


def _pasted(message: str) -> dict[str, Any]:
    """The recipe block the message offers, read as YAML the way a user's recipe would be."""
    return yaml.safe_load(message.split(PASTE_MARKER, 1)[1])


@pytest.fixture(scope="module")
def mpnet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny MPNet with the shipped MiniLM's (BERT) tokenizer: a model type aflora has no defaults for."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(MINILM))
    folder = tmp_path_factory.mktemp("mpnet") / "model"
    _tiny_mpnet(len(tokenizer), tokenizer.pad_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_error_names_the_type_lists_layers_and_offers_a_block() -> None:
    message = _error(_tiny_mpnet(vocab_size=100))
    assert "\n" not in message
    assert message.startswith("adapter.targets: no default targets for model type 'mpnet'")
    for suffix, (_, shape) in SUFFIXES.items():
        assert f"{suffix} (2 of {shape})" in message, suffix
    assert "guess" in message
    assert "left out, outside the numbered blocks: classifier.dense, classifier.out_proj" in message
    assert message.endswith(
        "paste: adapter: {targets: {attention: [attention.attn.q, attention.attn.k, attention.attn.v, "
        "attention.attn.o], ffn: [intermediate.dense, output.dense]}}"
    )
    targets = _pasted(message)["adapter"]["targets"]
    assert {kind: set(suffixes) for kind, suffixes in targets.items()} == {
        kind: {s for s, (k, _) in SUFFIXES.items() if k == kind} for kind in ("attention", "ffn")
    }
    assert not any("classifier" in s or "pooler" in s for suffixes in targets.values() for s in suffixes)


@pytest.mark.parametrize(
    "suffix, kind",
    [
        ("self_attn.q_proj", "attention"),
        ("attn.c_attn", "attention"),
        ("self_attn.out_proj", "attention"),
        ("EncDecAttention.o", "attention"),
        ("attention.output.dense", "attention"),
        ("mlp.gate_up_proj", "ffn"),
        ("fc1", "ffn"),
        ("DenseReluDense.wi_0", "ffn"),
        ("feed_forward.w1", None),
    ],
)
def test_kind_guess(suffix: str, kind: str | None) -> None:
    assert guess_kind(suffix) == kind


def test_layers_of_nested_blocks_become_a_regular_expression() -> None:
    expert = torch.nn.ModuleDict({"fc": torch.nn.Linear(4, 8)})
    block = torch.nn.ModuleDict({"experts": torch.nn.ModuleList([expert, copy.deepcopy(expert)])})
    model = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([block]), "lm_head": torch.nn.Linear(4, 2)})
    model.config = MPNetConfig()  # any config: only its model_type is read
    message = _error(model)
    assert "experts.*.fc (2 of 8×4)" in message and "lm_head" in message
    targets = _pasted(message)["adapter"]["targets"]
    assert targets == {"ffn": [r"re:.*\.experts\.\d+\.fc"]}
    found = find_targets(model, AdapterConfig(targets=targets))
    assert [t.name for t in found] == ["layers.0.experts.0.fc", "layers.0.experts.1.fc"]


def test_pasted_block_trains(mpnet_dir: Path, tmp_path: Path) -> None:
    raw = quick_recipe(tmp_path / "run", model={"name_or_path": str(mpnet_dir)}, training={"max_steps": 2})
    with pytest.raises(AfloraError) as info:
        Trainer(recipe_of(raw)).prepare()
    raw["adapter"] = {**raw["adapter"], **_pasted(str(info.value))["adapter"]}
    trainer = Trainer(recipe_of(raw))
    trainer.prepare()
    trainer.train()
    trainer.close()
    assert trainer.step == 2
    adapted = {name.split("layer.", 1)[1][2:]: module for name, module in adapter_modules(trainer.model).items()}
    assert set(adapted) == set(SUFFIXES)
    assert len(adapter_modules(trainer.model)) == 2 * len(SUFFIXES)
    kinds = {t.name.split("layer.", 1)[1][2:]: (t.kind, t.policy) for t in trainer.adapted.targets}
    assert kinds == {
        s: (k, "frozen" if k == "attention" else "adaptive") for s, (k, _) in SUFFIXES.items()
    }  # aflora's policy follows the guessed kinds
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]


def test_cli_prints_the_error_as_one_line_and_exits_2(mpnet_dir: Path, tmp_path: Path) -> None:
    raw = quick_recipe(tmp_path / "run", model={"name_or_path": str(mpnet_dir)})
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path / "r.yaml", raw))])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "'mpnet'" in lines[0] and "paste: adapter: {targets: {attention: [attention.attn.q" in lines[0]
    assert "Traceback" not in result.output
