"""Start-up guards that time nothing: what a command imports, read from `sys.modules` of a real process.

`aflora --help`, `aflora inspect` (text, --json, --plot) and reading a recipe import neither torch nor
transformers; the quickstart's path to its first optimizer step imports only the third-party packages listed
in FIRST_STEP_PACKAGES. A change that adds a heavy import to that path has to add it to the list, in plain
sight (benchmarks/startup.py measures what it costs).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from trained_checkpoints import aflora_run

HEAVY = {"torch", "transformers"}

# Third-party top-level packages loaded by the time the quickstart's first optimizer step ends, each on purpose:
# what aflora imports, and what torch, transformers and huggingface_hub import on their own (marked so). Not
# here on purpose: datasets, sklearn, matplotlib, bitsandbytes, gguf, peft, the trackers (tensorboard, wandb,
# mlflow, trackio), rouge_score, nltk, pandas.
FIRST_STEP_PACKAGES = {
    # aflora's own and its direct dependencies
    "aflora_cli", "torch", "transformers", "safetensors", "tokenizers", "huggingface_hub", "numpy",
    "typer", "rich", "yaml", "pydantic", "pydantic_core", "annotated_types", "typing_inspection",
    "typing_extensions", "shellingham", "click", "annotated_doc", "markdown_it", "mdurl", "pygments",
    # torch's own (dataloader, sympy for symbolic shapes, jinja2 for codegen templates, colorama for inductor's
    # messages: transformers' BERT imports generation utilities, which import torch._dynamo)
    "filelock", "fsspec", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "dill", "torchgen", "colorama",
    # transformers' own: kernels and accelerate integrations when installed, scipy from its loss module,
    # PIL from chat-template utilities, psutil, regex, packaging, tqdm, defusedxml
    "kernels", "accelerate", "scipy", "PIL", "psutil", "regex", "packaging", "tqdm", "defusedxml",
    "charset_normalizer", "idna", "certifi", "urllib3", "requests", "cloudpickle", "cython_runtime",
    # huggingface_hub's own HTTP client
    "httpx", "httpx2", "httpcore", "httpcore2", "h11", "anyio", "sniffio", "truststore", "brotli", "hf_xet",
    "google",  # protobuf, imported by transformers' tokenizer conversion utilities
}  # fmt: skip

PROBE = """
import json, sys
{setup}
names = sorted({{m.split(".")[0] for m in sys.modules}} - set(sys.stdlib_module_names))
print("MODULES " + json.dumps(names))
"""


def imported(setup: str, *, cwd: Path = ROOT) -> set[str]:
    """Top-level non-stdlib modules loaded by a process that runs `setup` (the CLI's exit is caught)."""
    code = PROBE.format(setup=setup)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("MODULES ")]
    assert lines, done.stdout + done.stderr
    return set(json.loads(lines[-1].removeprefix("MODULES ")))


def cli(*args: str) -> str:
    """Setup code running `aflora ARGS` in the probe's own process."""
    return (
        "from aflora_cli.cli import app\n"
        "try:\n"
        f"    app({list(args)!r})\n"
        "except SystemExit as exit:\n"
        "    assert exit.code in (0, None), exit.code\n"
    )


def test_help_imports_neither_torch_nor_transformers() -> None:
    assert not imported(cli("--help")) & HEAVY


@pytest.mark.parametrize("flags", [[], ["--json"], ["--plot", "PLOT"]], ids=["text", "json", "plot"])
def test_inspect_imports_neither_torch_nor_transformers(flags: list[str], tmp_path: Path) -> None:
    checkpoint = aflora_run() / "last"
    flags = [str(tmp_path / "heat.png") if flag == "PLOT" else flag for flag in flags]
    modules = imported(cli("inspect", str(checkpoint), *flags))
    assert not modules & HEAVY, sorted(modules & HEAVY)
    if flags:
        assert flags[0] != "--plot" or (tmp_path / "heat.png").stat().st_size > 0


def test_reading_every_shipped_recipe_imports_neither_torch_nor_transformers() -> None:
    setup = (
        "from pathlib import Path\n"
        "from aflora_cli.recipe import load_recipe\n"
        "for path in sorted(p for p in Path('recipes').glob('*.yaml') if not p.name.startswith('sweep-')):\n"
        "    load_recipe(path, ['training.max_steps=3'])\n"
    )
    assert not imported(setup) & HEAVY


def test_the_quickstarts_first_step_imports_only_what_is_listed(tmp_path: Path) -> None:
    """The real `aflora train recipes/quickstart.yaml` up to the end of its first optimizer step."""
    setup = (
        "import os\n"
        "from aflora_cli.training import step\n"
        "first = step.TrainingStep.optimizer_step\n"
        "def stop_after(self, *args, **kwargs):\n"
        "    first(self, *args, **kwargs)\n"
        "    raise SystemExit(0)\n"
        "step.TrainingStep.optimizer_step = stop_after\n"
        + cli("train", "recipes/quickstart.yaml", "--set", f"output_dir={tmp_path / 'run'}")
    )
    modules = imported(setup)
    assert "torch" in modules and "transformers" in modules  # the probe reached the step
    unexpected = sorted(modules - FIRST_STEP_PACKAGES - {"__main__", "_distutils_hack"})
    unexpected = [name for name in unexpected if not name.startswith(("_", "__editable__"))]
    assert not unexpected, f"new imports on the way to the first step: {unexpected}; list them on purpose"


def test_a_bad_recipe_is_refused_before_torch_loads(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("output_dir: x\nmodel: {name_or_path: m}\ndata: {task: sst2}\ntraining: {epochs: -1}\n")
    setup = (
        "from aflora_cli.cli import app\n"
        "try:\n"
        f"    app(['train', {str(recipe)!r}])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 2, exit.code\n"
    )
    assert not imported(setup) & HEAVY
