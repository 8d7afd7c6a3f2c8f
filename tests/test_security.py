"""What a checkpoint folder holds is never run: a pickled payload planted in any state file aflora reads is
refused in one line (or ignored), and the file its unpickling would write never appears. Base models load from
safetensors and without their own code unless the recipe allows otherwise."""

from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_runs import SAVE_EVERY, classifier_trainer, resume_copy
from typer.testing import CliRunner

from aflora_cli.cli import app
from aflora_cli.engine.checkpoint import read_state
from aflora_cli.engine.manifest import CHECKSUMS_KEY, FREEZER_FILE, MANIFEST_FILE, STATE_FILE, file_checksum
from aflora_cli.errors import AfloraError
from runs import quick_recipe, run, write_recipe
from trained_checkpoints import assert_user_error


class Payload:
    """Unpickling this writes `marker`: what an attacker's object would do, made visible."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def plant(file: Path, marker: Path, *, whole: bool) -> None:
    """Replace the state file by the payload alone, or hide the payload inside the state it held; as an attacker
    would, record the planted file's checksum in the checkpoint's manifest, so that only the loader stands in
    the way."""
    if whole:
        torch.save(Payload(marker), file)
    else:
        state = torch.load(file, weights_only=True)
        torch.save({**state, "note": {"from": [Payload(marker)]}}, file)
    manifest_file = file.parent / MANIFEST_FILE
    if manifest_file.is_file():
        manifest = json.loads(manifest_file.read_text())
        manifest[CHECKSUMS_KEY] = {**manifest.get(CHECKSUMS_KEY, {}), file.name: file_checksum(file)}
        manifest_file.write_text(json.dumps(manifest))


def test_the_payload_runs_when_unpickled_in_full(tmp_path: Path) -> None:
    """The check on the check: the planted file really does run code under a full unpickle."""
    marker = tmp_path / "ran.txt"
    plant_file = tmp_path / "state.pt"
    torch.save({"step": 1}, plant_file)
    plant(plant_file, marker, whole=False)
    torch.load(plant_file, weights_only=False)
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("whole", [True, False], ids=["whole-file", "nested"])
def test_cli_resume_never_runs_a_planted_state_file(whole: bool, tmp_path: Path) -> None:
    raw = quick_recipe(tmp_path / "run", training={"max_steps": 2})
    run(raw)
    state_file = tmp_path / "run" / "last" / STATE_FILE
    marker = tmp_path / "ran.txt"
    plant(state_file, marker, whole=whole)
    before = {path.name: path.read_bytes() for path in (tmp_path / "run" / "last").iterdir()}
    recipe = write_recipe(tmp_path / "recipe.yaml", raw)
    result = CliRunner().invoke(app, ["train", str(recipe), "--resume"])
    assert_user_error(result, f"{state_file}: holds an object aflora does not load", "source you trust")
    assert not marker.exists()
    assert {path.name: path.read_bytes() for path in (tmp_path / "run" / "last").iterdir()} == before


def test_callback_resume_never_runs_a_planted_freezer_file(tmp_path: Path) -> None:
    classifier_trainer(tmp_path / "run", max_steps=SAVE_EVERY).train()
    checkpoint = resume_copy(tmp_path / "run", tmp_path / "resumed", SAVE_EVERY)
    marker = tmp_path / "ran.txt"
    plant(checkpoint / FREEZER_FILE, marker, whole=False)
    with pytest.raises(AfloraError) as raised:
        classifier_trainer(tmp_path / "resumed").train(resume_from_checkpoint=str(checkpoint))
    message = str(raised.value)
    assert "\n" not in message and f"{checkpoint / FREEZER_FILE}: holds an object aflora does not load" in message
    assert not marker.exists()


def test_state_files_written_by_aflora_load_safely(tmp_path: Path) -> None:
    """Every type in the state aflora writes passes the weights-only loader, so no resume needs a full unpickle."""
    raw = quick_recipe(tmp_path / "run", training={"max_steps": 2})
    run(raw)
    state = read_state(tmp_path / "run" / "last" / STATE_FILE)
    assert state["step"] == 2 and set(state) >= {"optimizer", "scheduler", "freezer", "rng"}


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"", "damaged training-state file"), (b"not a torch file", "damaged training-state file")],
)
def test_damaged_state_file_is_one_line(content: bytes, expected: str, tmp_path: Path) -> None:
    file = tmp_path / STATE_FILE
    file.write_bytes(content)
    with pytest.raises(AfloraError, match=f"^{file}: {expected}") as raised:
        read_state(file)
    assert "\n" not in str(raised.value)


def test_a_state_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    file = tmp_path / STATE_FILE
    torch.save([1, 2, 3], file)
    with pytest.raises(AfloraError, match="a list, expected a mapping"):
        read_state(file)


def _bin_only_model(source: Path, dest: Path, payload_marker: Path | None = None) -> Path:
    """A copy of a tiny model whose weights are a pickled `pytorch_model.bin` (holding a payload, if asked)."""
    from safetensors.torch import load_file

    shutil.copytree(source, dest, ignore=lambda _dir, names: [n for n in names if n.endswith(".safetensors")])
    state: dict[str, Any] = load_file(str(source / "model.safetensors"))
    if payload_marker is not None:
        state["payload"] = Payload(payload_marker)
    torch.save(state, dest / "pytorch_model.bin")
    return dest


def _lm_run(tmp_path: Path, model: Path, **model_keys: Any) -> Any:
    from text_runs import lm_recipe, review_files

    raw = lm_recipe(tmp_path / "run", "llama", review_files(tmp_path / "data", 8, 4), training={"max_steps": 1})
    raw["model"] = {"name_or_path": str(model), **model_keys}
    recipe = write_recipe(tmp_path / "recipe.yaml", raw)
    return CliRunner().invoke(app, ["train", str(recipe)])


def test_pickled_base_weights_are_refused_unless_allowed(tmp_path: Path) -> None:
    from text_runs import model_dir

    marker = tmp_path / "ran.txt"
    model = _bin_only_model(model_dir("llama"), tmp_path / "bin-llama", payload_marker=marker)
    result = _lm_run(tmp_path, model)
    assert_user_error(result, f"{model} has no .safetensors weights", "model.allow_bin_weights: true")
    assert not marker.exists() and not (tmp_path / "run").exists()
    # allowed, transformers still reads the .bin with its weights-only loader: the payload is refused, not run
    result = _lm_run(tmp_path, model, allow_bin_weights=True)
    assert_user_error(result, f"could not load a model from {model}")
    assert not marker.exists()


def test_pickled_base_weights_load_when_allowed(tmp_path: Path) -> None:
    from text_runs import model_dir

    model = _bin_only_model(model_dir("llama"), tmp_path / "bin-llama")
    result = _lm_run(tmp_path, model, allow_bin_weights=True)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "last").is_dir()


def test_a_models_own_code_runs_only_when_the_recipe_trusts_it(tmp_path: Path) -> None:
    """A model folder of a type transformers does not know, whose config names its own Python code (`auto_map`):
    refused in one line, the code never imported; with `model.trust_remote_code: true` it is imported (here it
    writes the marker, then fails)."""
    import json

    from text_runs import model_dir

    model = Path(shutil.copytree(model_dir("llama"), tmp_path / "custom-llama"))
    marker = tmp_path / "ran.txt"
    (model / "custom_config.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig\n\n\nclass CustomConfig(LlamaConfig):\n    model_type = 'llama'\n",
        encoding="utf-8",
    )
    config = json.loads((model / "config.json").read_text())
    config |= {"model_type": "custom-llama", "auto_map": {"AutoConfig": "custom_config.CustomConfig"}}
    (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    result = _lm_run(tmp_path, model)
    assert_user_error(result, f"{model} needs its own Python code", "model.trust_remote_code: true")
    assert not marker.exists() and not (tmp_path / "run").exists()
    _lm_run(tmp_path, model, trust_remote_code=True)
    assert marker.read_text() == "ran"
