"""A base stored in bf16 or in 4/8 bits (bitsandbytes on the CPU): adapters, head and optimizer state stay
fp32, and training, resume, eval, generate, merge, PEFT export and the Python API all work on it."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from text_runs import lm_recipe, model_dir, review_files
from typer.testing import CliRunner

from aflora_cli.cli import app
from aflora_cli.engine.layer import AdapterLinear
from aflora_cli.engine.manifest import MANIFEST_FILE, WEIGHTS_FILE
from aflora_cli.errors import AfloraError
from aflora_cli.recipe import parse_recipe
from runs import run, write_recipe

bnb = pytest.importorskip("bitsandbytes")
runner = CliRunner()
NF4 = {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "bf16"}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return review_files(tmp_path_factory.mktemp("reviews"), train=24, validation=6)


def _recipe(out: Path, files: dict[str, Path], **model: Any) -> dict[str, Any]:
    raw = lm_recipe(
        out,
        "llama-64",
        files,
        training={"max_steps": 6, "save_every": 3, "eval_every": 3, "batch_size": 4, "max_length": 64},
        freezing={"t_i": 1, "t_f": 1},
        adapter={"method": "aflora", "rank": 4, "policy": {"attention": "adaptive", "ffn": "adaptive"}},
    )
    raw["model"].update(model)
    return raw


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory: pytest.TempPathFactory, files: dict[str, Path]) -> Path:
    out = tmp_path_factory.mktemp("nf4") / "run"
    run(_recipe(out, files, quantization=NF4))
    return out


# ------------------------------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    ("quantization", "message"),
    [
        ({"bits": 3}, "model.quantization.bits"),
        ({"bits": 8, "type": "nf4"}, "type apply to bits: 4 only"),
        ({"bits": 8, "compute_dtype": "bf16", "double_quant": False}, "double_quant, compute_dtype apply to bits: 4"),
        ({"bits": 4, "type": "int4"}, "model.quantization.type"),
    ],
)
def test_bad_quantization_settings_are_one_line(quantization: dict[str, Any], message: str) -> None:
    raw = {"output_dir": "x", "model": {"name_or_path": "m", "quantization": quantization}, "data": {"task": "sst2"}}
    with pytest.raises(AfloraError, match=message) as caught:
        parse_recipe(raw, "r.yaml")
    assert "\n" not in str(caught.value) and str(caught.value).startswith("r.yaml: model.quantization")


def _refused_before_loading(tmp_path: Path, files: dict[str, Path], **model: Any) -> str:
    """Run `aflora train` on a recipe whose base is a directory that cannot load: an error that names the
    model means it got that far; anything else was refused first."""
    raw = _recipe(tmp_path / "run", files, **model)
    raw["model"]["name_or_path"] = str(tmp_path)  # no config.json: loading would fail with its own message
    result = runner.invoke(app, ["train", str(write_recipe(tmp_path / "r.yaml", raw))])
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "run").exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_fp16_storage_on_the_cpu_is_refused_before_loading(tmp_path: Path, files: dict[str, Path]) -> None:
    assert "model.dtype: fp16 needs CUDA" in _refused_before_loading(tmp_path, files, dtype="fp16")


def test_quantization_without_bitsandbytes_names_the_extra(
    tmp_path: Path, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name))
    line = _refused_before_loading(tmp_path, files, quantization=NF4)
    assert "needs bitsandbytes" in line and "pip install 'aflora[quant]'" in line


# ---------------------------------------------------------------------------------------- training


def _adapter_layers(model: torch.nn.Module) -> list[AdapterLinear]:
    return [m for m in model.modules() if isinstance(m, AdapterLinear)]


def test_a_bf16_base_trains_with_fp32_adapters_and_optimizer_state(tmp_path: Path, files: dict[str, Path]) -> None:
    trainer = run(_recipe(tmp_path / "run", files, dtype="bf16"))
    layers = _adapter_layers(trainer.model)
    assert layers and all(layer.base.weight.dtype == torch.bfloat16 for layer in layers)
    assert all(p.dtype == torch.float32 for layer in layers for n, p in layer.named_parameters() if "base" not in n)
    states = [t for s in trainer.optimizer.state.values() for t in s.values() if t.dim() > 0]
    assert states and all(t.dtype == torch.float32 for t in states)
    manifest = json.loads((tmp_path / "run" / "last" / MANIFEST_FILE).read_text())
    assert manifest["base_model"]["dtype"] == "bf16" and manifest["base_model"]["quantization"] is None
    assert all(t.dtype == torch.float32 for t in load_file(str(tmp_path / "run" / "last" / WEIGHTS_FILE)).values())
    losses = [
        r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_a_bf16_classifier_head_trains_in_fp32(tmp_path: Path) -> None:
    from runs import quick_recipe

    raw = quick_recipe(tmp_path / "run", data={"max_train_samples": 32, "max_eval_samples": 16})
    raw["model"]["dtype"] = "bf16"
    raw["training"] |= {"max_steps": 2, "batch_size": 8}
    trainer = run(raw)
    head = dict(trainer.model.named_parameters())
    assert trainer.adapted.head_names and all(head[n].dtype == torch.float32 for n in trainer.adapted.head_names)
    assert trainer.model.bert.encoder.layer[0].intermediate.dense.base.weight.dtype == torch.bfloat16


def test_a_4bit_base_trains_freezes_and_checkpoints(nf4_run: Path) -> None:
    manifest = json.loads((nf4_run / "last" / MANIFEST_FILE).read_text())
    assert manifest["base_model"]["quantization"] == NF4
    assert manifest["recipe"]["model"]["quantization"] == NF4
    assert all(step is not None for step in manifest["freeze_log"].values())  # every PM froze by T - t_f
    tensors = load_file(str(nf4_run / "last" / WEIGHTS_FILE))
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    records = [json.loads(line) for line in (nf4_run / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
    assert [r["step"] for r in records if "eval" in r] == [3, 6]


def test_a_4bit_run_wraps_the_quantized_layers(tmp_path: Path, files: dict[str, Path]) -> None:
    raw = _recipe(tmp_path / "run", files, quantization=NF4)
    raw["training"] |= {"max_steps": 1, "warmup_ratio": 0.0, "gradient_checkpointing": True}
    raw["freezing"] = {"t_i": 0, "t_f": 0}  # a one-step run: its ramp must start at once (else it is refused)
    trainer = run(raw)
    layers = _adapter_layers(trainer.model)
    assert layers and all(isinstance(layer.base, bnb.nn.Linear4bit) for layer in layers)
    moved = [layer for layer in layers if layer.lambda_b.abs().sum() > 0]
    assert moved  # the vectors trained through the 4-bit layers, with activations recomputed


@pytest.mark.parametrize(
    "storage", [{"dtype": "bf16"}, {"quantization": NF4}, {"quantization": {"bits": 8}}], ids=["bf16", "nf4", "int8"]
)
def test_resume_over_a_half_precision_or_quantized_base_is_bit_exact(
    tmp_path: Path, files: dict[str, Path], storage: dict[str, Any]
) -> None:
    straight = _recipe(tmp_path / "straight", files, **storage)
    interrupted = _recipe(tmp_path / "interrupted", files, **storage)

    class Crash(Exception):
        pass

    def crash_at_step_5(kind: str, record: dict[str, Any]) -> None:
        if kind == "step" and record["step"] == 5:
            raise Crash

    run(copy.deepcopy(straight))
    with pytest.raises(Crash):
        run(copy.deepcopy(interrupted), on_event=crash_at_step_5)
    run(copy.deepcopy(interrupted), resume=True)
    a = load_file(str(tmp_path / "straight" / "last" / WEIGHTS_FILE))
    b = load_file(str(tmp_path / "interrupted" / "last" / WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------ the commands


def test_eval_rebuilds_the_quantized_base_and_equals_what_training_logged(nf4_run: Path) -> None:
    result = runner.invoke(app, ["eval", str(nf4_run / "last"), "--json"])
    assert result.exit_code == 0, result.output
    logged = json.loads((nf4_run / "last" / MANIFEST_FILE).read_text())["metrics"]["validation"]
    assert json.loads(result.stdout)["metrics"] == pytest.approx(logged, rel=1e-5)


def test_a_quantized_checkpoint_without_bitsandbytes_is_one_line(
    nf4_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name))
    for command in (["eval", str(nf4_run / "last")], ["merge", str(nf4_run / "last"), "--out", str(nf4_run / "m")]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2
        assert result.stderr.strip().splitlines() == [
            f"error: {nf4_run / 'last'}: its base was trained stored this way — model.quantization needs bitsandbytes, "
            "which is not installed: pip install 'aflora[quant]'"
        ]
    assert not (nf4_run / "m").exists()


def test_inspect_says_how_the_base_was_stored(nf4_run: Path) -> None:
    result = runner.invoke(app, ["inspect", str(nf4_run / "last")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "4-bit nf4 linear layers (bf16 compute, double quantization), the rest fp32" in result.output
    report = json.loads(runner.invoke(app, ["inspect", str(nf4_run / "last"), "--json"]).output)
    assert report["base_model"]["quantization"]["bits"] == 4


def test_generate_runs_on_a_quantized_checkpoint(nf4_run: Path) -> None:
    result = runner.invoke(
        app, ["generate", str(nf4_run / "last"), "--prompt", "Review: a fine film", "--max-new-tokens", "3"]
    )
    assert result.exit_code == 0, result.output


def test_merge_dequantizes_and_says_how_far_it_moved(nf4_run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    result = runner.invoke(app, ["merge", str(nf4_run / "last"), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert "dequantized to merge" in result.stdout and "(bf16)" in result.stdout
    gap = float(result.stdout.split("by up to ")[1].split("%")[0]) / 100
    assert 0 < gap < 0.25  # the 4-bit matmul runs in bf16; the merged fp32 model does not
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert getattr(merged.config, "quantization_config", None) is None
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_merge_folds_the_adapter_into_the_dequantized_weight(nf4_run: Path, tmp_path: Path) -> None:
    """W0 as bitsandbytes dequantizes it, plus ΔW, summed in fp32: exactly what the merged model holds."""
    from bitsandbytes.functional import dequantize_4bit
    from transformers import AutoModelForCausalLM

    from aflora_cli.adapted.loading import load_checkpoint

    layer = load_checkpoint(nf4_run / "last").adapted.model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        w0 = dequantize_4bit(layer.base.weight.data, layer.base.weight.quant_state).float()
        expected = w0 + layer.delta_weight()
    result = runner.invoke(app, ["merge", str(nf4_run / "last"), "--out", str(tmp_path / "m"), "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert torch.allclose(merged.model.layers[1].mlp.down_proj.weight, expected, rtol=0, atol=1e-6)
    assert layer.delta_weight().abs().max() > 1e-4  # the adapter moved the weight


def test_peft_export_of_a_quantized_run_records_how_the_base_was_loaded(nf4_run: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["merge", str(nf4_run / "last"), "--out", str(tmp_path / "peft"), "--format", "peft"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["aflora_base_storage"] == {"dtype": "fp32", "quantization": NF4}
    ours = load_file(str(nf4_run / "last" / WEIGHTS_FILE))
    exported = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    name = next(k for k in ours if k.endswith("q_proj.lora_A"))
    module = name.removesuffix(".lora_A")
    expected = ours[f"{module}.lambda_d"].unsqueeze(1) * ours[name]
    assert torch.equal(exported[f"base_model.model.{module}.lora_A.weight"], expected)


# ------------------------------------------------------------------------------------ Python API


def test_add_adapters_on_a_model_the_user_loaded_in_4bit_records_it(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from aflora_cli import add_adapters, load_checkpoint, save_adapters

    folder = model_dir("llama-64")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, device_map="cpu")
    adapters = add_adapters(model, {"adapter": {"policy": {"attention": "trainable", "ffn": "trainable"}}})
    assert adapters.head_names == []
    assert all(isinstance(layer.base, bnb.nn.Linear4bit) for layer in _adapter_layers(model))
    files = review_files(tmp_path / "data", train=8, validation=4)
    data = {"task": "custom", "format": "prompt_response", **{k: str(v) for k, v in files.items()}}
    save_adapters(model, tmp_path / "ckpt", data=data, base_model=str(folder))
    recipe_model = json.loads((tmp_path / "ckpt" / MANIFEST_FILE).read_text())["recipe"]["model"]
    assert recipe_model["quantization"] == {"bits": 4, "type": "nf4", "double_quant": False, "compute_dtype": "bf16"}
    rebuilt = load_checkpoint(tmp_path / "ckpt")
    assert all(isinstance(layer.base, bnb.nn.Linear4bit) for layer in _adapter_layers(rebuilt.model))


def test_add_adapters_on_a_bf16_model_keeps_the_adapters_fp32(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from aflora_cli import add_adapters

    model = AutoModelForCausalLM.from_pretrained(model_dir("llama-64"), dtype=torch.bfloat16)
    add_adapters(model)
    layers = _adapter_layers(model)
    assert all(layer.lora_A.dtype == torch.float32 and layer.base.weight.dtype == torch.bfloat16 for layer in layers)
    ids = torch.tensor([[5, 6, 7, 8]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(layer.lambda_b.grad is not None and layer.lambda_b.grad.dtype == torch.float32 for layer in layers)


def test_a_four_bit_setting_records_the_defaults_it_used() -> None:
    """`quantization: {bits: 4}` alone is stored with nf4, double quantization and bf16 compute filled in, so a
    checkpoint says what was used; an older manifest that recorded them as null still reads the same."""
    from aflora_cli.commands.report import _storage_text

    raw = {"output_dir": "x", "model": {"name_or_path": "m", "quantization": {"bits": 4}}, "data": {"task": "sst2"}}
    recipe = parse_recipe(raw, "r.yaml")
    assert recipe.model_dump(mode="json")["model"]["quantization"] == NF4
    assert recipe.model.storage().describe()["quantization"] == NF4
    old = {"bits": 4, "type": "nf4", "double_quant": None, "compute_dtype": None}
    text = "4-bit nf4 linear layers (bf16 compute, double quantization), the rest fp32"
    assert _storage_text({"dtype": "fp32", "quantization": old}) == text
    eight = parse_recipe({**raw, "model": {"name_or_path": "m", "quantization": {"bits": 8}}}, "r.yaml")
    assert eight.model_dump(mode="json")["model"]["quantization"] == {
        "bits": 8,
        "type": None,
        "double_quant": None,
        "compute_dtype": None,
    }


def test_bitsandbytes_import_warnings_stay_quiet(caplog: pytest.LogCaptureFixture) -> None:
    """What bitsandbytes and the `kernels` package log while bitsandbytes is imported (on CPUs with AVX512-BF16,
    offline: a publisher-trust notice and a failed kernel lookup) is not printed; errors still are, and the
    loggers are as they were afterwards."""
    import logging

    from aflora_cli.engine.storage import quiet_loggers

    lookup, ops = logging.getLogger("kernels._internals.hf_hub"), logging.getLogger("bitsandbytes.backends.cpu.ops")
    with quiet_loggers("bitsandbytes", "kernels"):
        lookup.warning("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'")
        ops.warning("Failed to load CPU gemm_4bit_forward from kernels-community")
        ops.error("a real error")
    ops.warning("after the import")
    assert [record.getMessage() for record in caplog.records] == ["a real error", "after the import"]
