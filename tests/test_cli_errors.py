"""Bad input to every command: exactly one line on stderr (`error: ...`), exit code 2, nothing on stdout, no
traceback — for the commands' own checks and for the argument parser's (unknown option, missing argument, bad
value) alike."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import pytest
from text_runs import model_dir, review_rows, write_jsonl
from typer.testing import CliRunner

from aflora_cli.cli import app

runner = CliRunner()


@functools.cache
def _tiny_checkpoint() -> Path:
    """An untrained prompt/response checkpoint of the tiny LLaMA (save_adapters: no training needed)."""
    from transformers import AutoModelForCausalLM

    from aflora_cli import add_adapters, save_adapters

    folder = Path(tempfile.mkdtemp(prefix="aflora-cli-errors-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    train = write_jsonl(folder / "train.jsonl", review_rows("train", 4))
    model = AutoModelForCausalLM.from_pretrained(model_dir("llama"))
    add_adapters(model)
    data = {"task": "custom", "format": "prompt_response", "metric": "exact_match", "train_file": str(train)}
    return save_adapters(model, folder / "checkpoint", data=data)


def _bad_data() -> str:
    return str(write_jsonl(_tiny_checkpoint().parent / "bad.jsonl", [{"prompt": "Review: fine"}]))


CASES = {
    "train, no recipe": (lambda: ["train", "/nonexistent/recipe.yaml"], "/nonexistent/recipe.yaml: recipe not found"),
    "train, unknown option": (lambda: ["train", "r.yaml", "--bogus"], "No such option: --bogus"),
    "eval, not a checkpoint": (lambda: ["eval", "/nonexistent", "--data", "x.jsonl"], "not a checkpoint directory"),
    "eval --data BAD": (lambda: ["eval", str(_tiny_checkpoint()), "--data", _bad_data()], "missing column 'response'"),
    "eval, no checkpoint given": (lambda: ["eval"], "Missing argument 'CKPT'; see '"),
    "generate, not a checkpoint": (lambda: ["generate", "/nonexistent", "--prompt", "hi"], "not a checkpoint"),
    "generate, bad value": (
        lambda: ["generate", "/x", "--max-new-tokens", "0"],
        "Invalid value for '--max-new-tokens'",
    ),
    "merge, no --out": (lambda: ["merge", "/x"], "Missing option '--out'"),
    "merge, bad dtype": (lambda: ["merge", "/x", "--out", "/y", "--dtype", "q4"], "Invalid value for '--dtype'"),
    "merge, not a checkpoint": (lambda: ["merge", "/nonexistent", "--out", "/tmp/never"], "not a checkpoint"),
    "inspect, not a checkpoint": (lambda: ["inspect", "/nonexistent"], "/nonexistent: not a checkpoint directory"),
    "inspect, bad figure name": (lambda: ["inspect", "/nonexistent", "--plot", "x.gif"], "--plot"),
    "no such command": (lambda: ["bogus"], "No such command 'bogus'"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_exactly_one_line_on_stderr(case: str) -> None:
    args, fragment = CASES[case]
    result = runner.invoke(app, args())
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n"), repr(result.stderr)  # no blank line
    assert result.stderr.startswith("error: ") and fragment in result.stderr, result.stderr
    assert not Path("/tmp/never").exists()


def test_the_bare_command_still_prints_its_help() -> None:
    result = runner.invoke(app, [])
    assert "Usage" in result.stdout and "train" in result.stdout
