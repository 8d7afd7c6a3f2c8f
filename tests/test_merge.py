"""`aflora merge`: a plain transformers model (adapters folded into W0) or a PEFT LoRA adapter, same outputs."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

import aflora_cli
from aflora_cli.adapted.loading import load_checkpoint
from aflora_cli.cli import app
from aflora_cli.commands.merging import merged_model
from aflora_cli.engine.inject import adapter_modules
from aflora_cli.engine.manifest import WEIGHTS_FILE
from aflora_cli.tasks.tables import SHIPPED_DIR, read_table
from trained_checkpoints import (
    BAD_CHECKPOINTS,
    aflora_run,
    assert_user_error,
    bad_checkpoint,
    lora_run,
    manifest_of,
)

runner = CliRunner()
ROWS = 32


def merge(*args: str) -> None:
    result = runner.invoke(app, ["merge", *args])
    assert result.exit_code == 0, result.output


def validation_batch(tokenizer) -> dict[str, torch.Tensor]:
    """The first rows of the movie-review validation set, padded, as the model takes them."""
    sentences = read_table(SHIPPED_DIR / "movie_reviews" / "validation.tsv")["sentence"][:ROWS]
    return dict(tokenizer(sentences, truncation=True, max_length=32, padding=True, return_tensors="pt"))


@torch.no_grad()
def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.eval()(**batch).logits.float()


@pytest.fixture(scope="module")
def reference() -> dict:
    """The unmerged adapter model of the aflora `best` checkpoint and its logits on the validation rows."""
    checkpoint = aflora_run() / "best"
    adapted = load_checkpoint(checkpoint).adapted
    batch = validation_batch(adapted.tokenizer)
    return {"checkpoint": checkpoint, "adapted": adapted, "batch": batch, "logits": logits(adapted.model, batch)}


@pytest.fixture(scope="module")
def merged_dir(reference: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "model"
    merge(str(reference["checkpoint"]), "--out", str(out))
    return out


def test_merged_model_loads_as_plain_transformers_and_matches(reference: dict, merged_dir: Path) -> None:
    model, info = AutoModelForSequenceClassification.from_pretrained(merged_dir, output_loading_info=True)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    config = model.config
    assert config.num_labels == 2 and config.problem_type == "single_label_classification"
    assert config.id2label == {0: "negative", 1: "positive"}

    merged = logits(model, reference["batch"])
    assert (merged - reference["logits"]).abs().max().item() <= 1e-4

    # the weights are the plain transformers keys: no adapter tensors, the trained head, changed W0
    with safe_open(str(merged_dir / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        head = handle.get_tensor("classifier.weight")
        ffn = handle.get_tensor("bert.encoder.layer.0.output.dense.weight")
    assert not any("lora" in key or "lambda" in key or ".base." in key for key in keys)
    checkpoint_tensors = load_file(str(reference["checkpoint"] / WEIGHTS_FILE))
    assert torch.equal(head, checkpoint_tensors["classifier.weight"])
    w0 = reference["adapted"].model.get_submodule("bert.encoder.layer.0.output.dense").base.weight
    assert (ffn - w0).abs().max().item() > 1e-6  # the adapter's update is in there
    assert (
        AutoTokenizer.from_pretrained(merged_dir)("a fine film")["input_ids"]
        == reference["adapted"].tokenizer("a fine film")["input_ids"]
    )


def test_merged_model_loads_without_aflora(merged_dir: Path, tmp_path: Path) -> None:
    """A fresh interpreter in which `import aflora_cli` fails still loads and runs the merged model."""
    bf16 = tmp_path / "bf16"
    merge(str(aflora_run() / "best"), "--out", str(bf16), "--dtype", "bf16")
    script = f"""
import json, sys
sys.modules["aflora_cli"] = None  # any import of aflora fails
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
out = {{}}
for name, folder in (("fp32", {str(merged_dir)!r}), ("bf16", {str(bf16)!r})):
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    batch = AutoTokenizer.from_pretrained(folder)(["a fine film", "dull and long"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out[name] = {{"dtype": str(model.dtype), "logits": model(**batch).logits.float().tolist()}}
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["fp32"]["dtype"] == "torch.float32" and out["bf16"]["dtype"] == "torch.bfloat16"
    fp32, bf = torch.tensor(out["fp32"]["logits"]), torch.tensor(out["bf16"]["logits"])
    assert (fp32 - bf).abs().max().item() < 0.1
    with safe_open(str(bf16 / "model.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("classifier.weight").dtype == torch.bfloat16


def test_merge_refuses_a_non_empty_dir_and_replaces_it_with_force(tmp_path: Path, monkeypatch) -> None:
    checkpoint = aflora_run() / "best"
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_user_error(runner.invoke(app, ["merge", str(checkpoint), "--out", str(out)]), str(out), "--force")
    assert (out / "keep.txt").read_text() == "mine"

    # a failure half way through writing (disk full) leaves DIR as it was and no temporary folder
    from transformers import PreTrainedTokenizerBase

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)
        result = runner.invoke(app, ["merge", str(checkpoint), "--out", str(out), "--force"])
    assert_user_error(result, str(out), "No space left")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]

    merge(str(checkpoint), "--out", str(out), "--force", "--format", "peft")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_merge_refuses_unwritable_or_overlapping_output(tmp_path: Path) -> None:
    checkpoint = aflora_run() / "best"
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for out in (blocker / "sub" / "model", blocker):
        assert_user_error(runner.invoke(app, ["merge", str(checkpoint), "--out", str(out)]), str(out))
    assert_user_error(
        runner.invoke(app, ["merge", str(checkpoint), "--out", str(checkpoint.parent), "--force"]),
        str(checkpoint.parent),
        "overlaps",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    assert (checkpoint / WEIGHTS_FILE).is_file()


@pytest.mark.parametrize("kind", BAD_CHECKPOINTS)
def test_merge_bad_checkpoint_is_one_clear_line(kind: str, tmp_path: Path) -> None:
    checkpoint = bad_checkpoint(kind, aflora_run() / "best", tmp_path / "in")
    out = tmp_path / "out"
    assert_user_error(runner.invoke(app, ["merge", str(checkpoint), "--out", str(out)]), str(checkpoint))
    assert not out.exists()


def _peft_logits(export: Path, batch: dict[str, torch.Tensor], base_dir: Path) -> torch.Tensor:
    from peft import PeftModel

    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    return logits(PeftModel.from_pretrained(base, export), batch)


def test_peft_export_of_aflora_matches(reference: dict, tmp_path: Path) -> None:
    checkpoint, adapted = reference["checkpoint"], reference["adapted"]
    out = tmp_path / "peft"
    merge(str(checkpoint), "--out", str(out), "--format", "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    manifest = manifest_of(checkpoint)
    targets = [target["name"] for target in manifest["targets"]]
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert config["r"] == 4 and config["lora_alpha"] == 4
    assert config["target_modules"] == targets and config["modules_to_save"] == ["classifier"]

    tensors = load_file(str(out / "adapter_model.safetensors"))
    ours = load_file(str(checkpoint / WEIGHTS_FILE))
    name = "bert.encoder.layer.2.intermediate.dense"
    expected_a = ours[f"{name}.lambda_d"].unsqueeze(1) * ours[f"{name}.lora_A"]
    expected_b = ours[f"{name}.lambda_b"].unsqueeze(1) * ours[f"{name}.lora_B"]
    assert torch.allclose(tensors[f"base_model.model.{name}.lora_A.weight"], expected_a)
    assert torch.allclose(tensors[f"base_model.model.{name}.lora_B.weight"], expected_b)
    assert torch.equal(tensors["base_model.model.classifier.weight"], ours["classifier.weight"])
    assert len(tensors) == 2 * len(targets) + 2

    peft_out = _peft_logits(out, reference["batch"], adapted.model_dir)
    assert (peft_out - reference["logits"]).abs().max().item() <= 1e-4


def test_peft_export_of_lora_matches(tmp_path: Path) -> None:
    checkpoint = lora_run() / "last"
    loaded = load_checkpoint(checkpoint)
    adapted, manifest = loaded.adapted, loaded.manifest
    assert manifest["method"] == "lora" and manifest["scaling"] == 2.0
    batch = validation_batch(adapted.tokenizer)
    ours = logits(adapted.model, batch)
    out = tmp_path / "peft"
    merge(str(checkpoint), "--out", str(out), "--format", "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8  # scaling alpha / r = 2 as trained
    tensors = load_file(str(out / "adapter_model.safetensors"))
    saved = load_file(str(checkpoint / WEIGHTS_FILE))
    name = "bert.encoder.layer.0.attention.self.query"
    assert torch.equal(tensors[f"base_model.model.{name}.lora_A.weight"], saved[f"{name}.lora_A"])
    assert torch.equal(tensors[f"base_model.model.{name}.lora_B.weight"], saved[f"{name}.lora_B"])
    assert saved[f"{name}.lora_B"].abs().max() > 0  # trained away from LoRA's zero init
    assert (_peft_logits(out, batch, adapted.model_dir) - ours).abs().max().item() <= 1e-4
    # merging folds the scaling in too
    merged = merged_model(load_checkpoint(checkpoint))
    assert not adapter_modules(merged)
    assert (logits(merged, batch) - ours).abs().max().item() <= 1e-4


def test_aflora_does_not_import_peft() -> None:
    """peft is a test dependency only."""
    package = Path(aflora_cli.__file__).parent
    for file in package.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(name == "peft" or name.startswith("peft.") for name in names), file
