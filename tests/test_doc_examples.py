"""The shell examples of README.md and docs/ run as written, on tiny settings.

Substitutions, for every test here (besides those `doc_examples.run_shell` states): each `aflora train` gets
`--set` pairs after its own arguments that make it a few steps on a few rows (TINY, TINY_LM); the commands run in
a temporary folder holding a link to the repository's `recipes/`; an example's `/tmp/...` and `docs/` outputs are
written into that folder instead. The language-model examples load SmolLM2-135M and are `slow`, and so are the
examples that would only add another short training run of MiniLM to the default suite."""

from __future__ import annotations

import atexit
import csv
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import ROOT
from doc_examples import block_before, example, run_shell
from safetensors import safe_open

from aflora_cli.engine.manifest import MANIFEST_FILE

TINY = [
    "--set", "training.max_steps=2",
    "--set", "training.batch_size=8",
    "--set", "data.max_train_samples=32",
    "--set", "data.max_eval_samples=16",
    "--set", "training.eval_batch_size=16",
]  # fmt: skip
TINY_LM = [
    "--set", "training.max_steps=2",
    "--set", "training.batch_size=4",
    "--set", "data.max_train_samples=16",
    "--set", "data.max_eval_samples=4",
    "--set", "training.eval_batch_size=4",
    "--set", "eval.max_new_tokens=8",
]  # fmt: skip


def _with_recipes(folder: Path) -> Path:
    (folder / "recipes").symlink_to(ROOT / "recipes")
    return folder


def _manifest(checkpoint: Path) -> dict:
    return json.loads((checkpoint / MANIFEST_FILE).read_text(encoding="utf-8"))


def _ran_in_a_new_folder(name: str, train_settings: list[str]) -> Path:
    """A new folder (with the recipes, removed at exit) in which the example `name` ran."""
    folder = _with_recipes(Path(tempfile.mkdtemp(prefix=f"aflora-doc-{name}-")))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    here = Path.cwd()
    os.chdir(folder)
    try:
        run_shell(example(name).text, train_settings)
    finally:
        os.chdir(here)
    return folder


@functools.cache
def _quickstart() -> Path:
    """A folder where the set-up example ran (once per session): `runs/quickstart` with its checkpoints."""
    return _ran_in_a_new_folder("setup-quickstart", TINY)


def test_the_set_up_example_trains_the_quickstart() -> None:
    assert example("gs-setup-quickstart").text == example("setup-quickstart").text  # getting-started repeats README
    run = _quickstart() / "runs" / "quickstart"
    assert _manifest(run / "last")["step"] == 2 and (run / "best").is_dir()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("accuracy" in json.dumps(record) for record in records)


def test_the_commands_after_the_quickstart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(_quickstart())
    inspected, evaluated = run_shell(example("gs-after-quickstart").text, TINY)
    assert "quickstart" in inspected and "accuracy" in evaluated


def test_the_merge_examples_write_each_format(monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _quickstart()
    monkeypatch.chdir(folder)
    run_shell(example("merge-formats").text, TINY)
    run_shell(example("merge-card").text, TINY)
    assert (folder / "quickstart-merged" / "config.json").is_file()
    with safe_open(str(folder / "quickstart-bf16" / "model.safetensors"), "pt") as weights:
        assert str(weights.get_tensor(next(iter(weights.keys()))).dtype) == "torch.bfloat16"
    assert (folder / "quickstart-peft" / "adapter_config.json").is_file()
    assert (folder / "merged" / "README.md").is_file() and not (folder / "merged-bare" / "README.md").exists()
    assert (folder / "merged-bare" / "config.json").is_file()


def test_the_readme_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(_with_recipes(tmp_path))
    _, evaluated, merged, _ = run_shell(example("readme-commands").text, TINY)
    assert _manifest(tmp_path / "runs/qs/best")["step"] == 2 and "accuracy" in evaluated
    assert (tmp_path / "qs-merged" / "config.json").is_file() and "qs-merged" in merged
    assert (tmp_path / "qs-run.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow  # one more training run; the setup example's already covers train + inspect
def test_the_inspect_plot_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(_with_recipes(tmp_path))
    text = example("inspect-plot").text
    assert "/tmp/qs-plot" in text and "docs/quickstart-run.png" in text
    run_shell(text.replace("/tmp/qs-plot", "qs-plot").replace("docs/quickstart-run.png", "run.png"), TINY)
    assert (tmp_path / "run.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow  # one more training run
def test_the_override_examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dry run writes nothing; the second line's `max_steps=40` is overridden by TINY's 2, given after it."""
    monkeypatch.chdir(_with_recipes(tmp_path))
    planned, _ = run_shell(example("recipe-overrides").text, TINY)
    assert "trainable parameters at start" in planned and "output_dir: runs/quickstart" in planned
    assert not (tmp_path / "runs" / "quickstart").exists()
    assert _manifest(tmp_path / "runs/qs-40/last")["step"] == 2


@pytest.mark.parametrize(
    "name",
    ["readme-own-data", pytest.param("gs-own-data", marks=pytest.mark.slow)],  # the same recipe again
)
def test_training_on_your_own_data(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe above the command, saved as my-recipe.yaml beside a train.csv and validation.csv made of the
    shipped movie-review sentences, their labels written as class names."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-recipe.yaml").write_text(block_before(name, "yaml"), encoding="utf-8")
    source = ROOT / "aflora_cli" / "datasets" / "movie_reviews" / "train.tsv"
    with source.open(encoding="utf-8", newline="") as rows_file:
        rows = list(csv.DictReader(rows_file, delimiter="\t", quoting=csv.QUOTE_NONE))
    for file, part in (("train.csv", rows[:64]), ("validation.csv", rows[64:96])):
        with (tmp_path / file).open("w", encoding="utf-8", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(["text", "label"])
            writer.writerows([row["sentence"], ("negative", "positive")[int(row["label"])]] for row in part)
    run_shell(example(name).text, TINY)
    manifest = _manifest(tmp_path / "runs" / "mine" / "last")
    assert manifest["recipe"]["data"]["task"] == "custom" and manifest["step"] == 2
    assert "positive" in json.dumps(manifest)  # the class names read from the labels


def test_the_test_command_of_readme_and_docs_is_the_one_ci_runs() -> None:
    """`.ci/run` runs the test command (with durations on): the README's line is how CI and users run the suite."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    for name in ("setup-tests", "gs-setup-tests"):
        command = example(name).text.splitlines()[-1]
        assert any(line.startswith(command) for line in ci), command


# ---- language models (slow: SmolLM2-135M) ------------------------------------------------------------------


@functools.cache
def _lm_quickstart() -> Path:
    return _ran_in_a_new_folder("lm-quickstart", TINY_LM)


@pytest.mark.slow
def test_the_lm_quickstart_and_the_commands_on_its_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _lm_quickstart()
    assert _manifest(folder / "runs/quickstart-lm/last")["step"] == 2
    monkeypatch.chdir(folder)
    for name in ("lm-commands", "eval-predictions"):
        run_shell(example(name).text, TINY_LM)
        rows = [json.loads(line) for line in (folder / "preds.jsonl").read_text().splitlines()]
        assert len(rows) == 4
        assert {"prompt", "source", "output", "extracted", "reference", "correct", "scores"} <= set(rows[0])
    prompted, piped = run_shell(example("generate").text, TINY_LM)
    assert prompted.strip() and piped.strip()


@pytest.mark.slow
def test_the_readme_generate_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(_with_recipes(tmp_path))
    _, generated = run_shell(example("readme-generate").text, TINY_LM)
    assert generated.strip()


@pytest.mark.slow
def test_the_gguf_out_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`llama-cli` is not installed here: in its place the GGUF file it names is read back with the gguf package."""
    from gguf import GGUFReader

    def read_back(words: list[str]) -> bool:
        if words[0] != "llama-cli":
            return False
        reader = GGUFReader(words[words.index("-m") + 1])
        assert len(reader.tensors) > 0
        return True

    monkeypatch.chdir(_with_recipes(tmp_path))
    run_shell(example("gguf-out").text, TINY_LM, other=read_back)
    assert (tmp_path / "smollm2-headlines" / "model-q8_0.gguf").is_file()
