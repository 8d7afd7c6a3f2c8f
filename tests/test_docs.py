"""The documentation keeps its promises: every shell or Python example is run by a test or says why not, the
recipe reference is the typed recipe's own, README stays short with its two set-up commands, and every command's
help names the docs section that explains it."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest
from conftest import ROOT
from doc_examples import RUNNABLE, blocks
from typer.testing import CliRunner

from aflora_cli.cli import app
from aflora_cli.recipe import Recipe


def _reference_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("recipes_reference", ROOT / "scripts" / "recipes_reference.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_shell_or_python_example_is_run_by_a_test_or_marked_not_run() -> None:
    runnable = [block for block in blocks() if block.language in RUNNABLE]
    assert len(runnable) > 20  # README and the docs pages are read
    unmarked = [block.where for block in runnable if block.name is None and not block.not_run]
    assert unmarked == [], f"examples neither run nor marked <!-- not-run: REASON -->: {unmarked}"
    both = [block.where for block in runnable if block.name is not None and block.not_run]
    assert both == []


def test_every_named_example_is_named_by_a_test_and_names_are_unique() -> None:
    names = [block.name for block in blocks() if block.name is not None]
    assert len(names) == len(set(names)), sorted(name for name in names if names.count(name) > 1)
    sources = "".join(
        path.read_text(encoding="utf-8") for path in (ROOT / "tests").glob("test_*.py") if path.name != "test_docs.py"
    )
    unused = [name for name in names if f'"{name}"' not in sources]
    assert unused == [], f"examples that no test runs: {unused}"


def test_markers_apply_to_the_fence_right_after_them(tmp_path: Path) -> None:
    from doc_examples import _blocks_of

    page = tmp_path / "page.md"
    page.write_text(
        "<!-- example: one -->\n```bash\nls\n```\n\n<!-- not-run: needs a GPU -->\n```python\nx = 1\n```\n\n"
        "<!-- example: stale -->\nSome prose in between.\n\n```sh\nls\n```\n\n"
        "<!-- examples: a b -->\n## Heading\n\ntext\n\n```bash\nls\n```\n\n```bash\npwd\n```\n",
        encoding="utf-8",
    )
    found = [(block.language, block.name, block.not_run) for block in _blocks_of(page)]
    assert found == [
        ("bash", "one", None),
        ("python", None, "needs a GPU"),
        ("sh", None, None),
        ("bash", "a", None),
        ("bash", "b", None),
    ]


def test_the_recipe_reference_page_is_what_the_models_give() -> None:
    page = (ROOT / "docs" / "recipes-reference.md").read_text(encoding="utf-8")
    assert page == _reference_script().render(), "run: python scripts/recipes_reference.py"


def _fields(model: type, prefix: str = "") -> list[str]:
    from pydantic import BaseModel

    keys = []
    for name, field in model.model_fields.items():  # type: ignore[attr-defined]
        args = [field.annotation, *getattr(field.annotation, "__args__", ())]
        section = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
        keys += _fields(section, f"{prefix}{name}.") if section else [f"{prefix}{name}"]
    return keys


def test_the_recipe_reference_has_a_row_for_every_key_with_type_default_and_range() -> None:
    page = _reference_script().render()
    sections = dict(re.findall(r"^## (?:`([\w.]+)`|Top level)\n(.*?)(?=^## |\Z)", page, flags=re.M | re.S))
    for key in _fields(Recipe):
        section, _, name = key.rpartition(".")
        assert f"| `{name}` |" in sections[section], key
    # rows as written by hand from the models
    assert "| `rank` | int | `4` | > 0 | r, the rank of A (r×in) and B (out×r) |" in sections["adapter"]
    assert "| `beta1` | float | `0.85` | ≥ 0, < 1 | β1 of the EMA" in sections["freezing"]
    assert "| `warmup_ratio` | float | `0.06` | ≥ 0, ≤ 1 |" in sections["training"]
    assert "| `bits` | `4` \\| `8` | required |  |" in sections["model.quantization"]
    trackers = "list of `tensorboard` \\| `wandb` \\| `mlflow` \\| `trackio`"
    assert f"| `report_to` | {trackers} | `[]` |" in sections["logging"]
    assert "| `project` | str | `aflora` | length ≥ 1 |" in sections["logging"]
    rows = re.findall(r"^\| `\w+` \|.*$", page, flags=re.M)
    # and one row per section: seven at the top, quantization in model, fsdp in training
    assert len(rows) == len(_fields(Recipe)) + 9
    assert [row for row in rows if row.endswith("|  |")] == []  # every key has a description
    seed_row = "| `seed` | int or null | null |  | draws the max_*_samples subsets; default: the run's seed |"
    assert seed_row in sections["data"]  # the comment on the field's line


def test_readme_is_short_and_keeps_its_two_set_up_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150
    section = readme[readme.index("## Two commands") : readme.index("\n## ", readme.index("## Two commands") + 3)]
    assert (
        "```bash\n# set up, then fine-tune the embedded default offline: MiniLM learns movie-review sentiment\n"
        "# (3,000 sentences, 2 epochs; validation accuracy about 0.82)\n"
        "scripts/install.sh && .venv/bin/aflora train recipes/quickstart.yaml\n```\n"
    ) in section
    assert (
        "```bash\n# set up, then run the test suite\n"
        "scripts/install.sh && HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python -m pytest -q\n```\n"
    ) in section
    assert "did not beat\nLoRA" in readme and "fewest parameters still training" in readme


@pytest.mark.parametrize("command", [None, "train", "eval", "generate", "merge", "inspect"])
def test_help_names_the_docs_section_of_the_command(command: str | None) -> None:
    result = CliRunner().invoke(app, [command, "--help"] if command else ["--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    pages = re.findall(r"docs/([\w-]+\.md)(?:#([\w-]+))?", text)
    assert pages, text
    page, anchor = pages[0]
    assert page == "commands.md" and anchor == (command or "")
    headings = re.findall(r"^## (\w+)$", (ROOT / "docs" / page).read_text(encoding="utf-8"), flags=re.M)
    if command:
        assert command in headings
