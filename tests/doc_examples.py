"""The fenced examples of README.md and docs/*.md, and a runner for their shell lines.

An HTML comment on the line before a fence says what the block is (docs/contributing.md):
`<!-- example: NAME -->` — a test runs it and names it; `<!-- not-run: REASON -->` — not runnable here.
`<!-- examples: NAME1 NAME2 -->` names the next fences in order (README's "Two commands" section stays as it
was: the comment sits above its heading).

The runner plays `aflora ...` lines through the real Typer app in this process (no new interpreter per line),
after the substitutions the calling test passes; any other program is refused unless the test handles it.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from conftest import ROOT

SHELL = {"bash", "sh", "shell", "console"}
RUNNABLE = SHELL | {"python", "py"}
_MARKER = re.compile(r"^<!--\s*(example|examples|not-run):\s*(.*?)\s*-->\s*$")
_FENCE = re.compile(r"^(`{3,})\s*([\w+-]*)")


@dataclass(frozen=True)
class Block:
    file: Path
    line: int  # 1-based line of the opening fence
    language: str
    text: str
    name: str | None
    not_run: str | None

    @property
    def where(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}"


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks_of(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    names: list[str] = []  # from `examples:`, consumed fence by fence
    single: str | None = None  # `example:`, for the very next fence
    not_run: str | None = None
    index = 0
    while index < len(lines):
        line = lines[index]
        marker = _MARKER.match(line)
        fence = _FENCE.match(line)
        if marker:
            kind, value = marker.groups()
            if kind == "example":
                single = value
            elif kind == "examples":
                names = value.split()
            else:
                not_run = value
        elif fence:
            ticks, language = fence.groups()
            end = index + 1
            while end < len(lines) and not lines[end].startswith(ticks):
                end += 1
            name = single if single is not None else (names.pop(0) if names else None)
            text = "\n".join(lines[index + 1 : end]) + "\n"
            found.append(Block(path, index + 1, language.lower(), text, name, not_run))
            single = not_run = None
            index = end
        elif line.strip() and not line.startswith("#"):
            single = not_run = None  # a marker belongs to the fence right after it (headings aside)
        index += 1
    return found


def blocks() -> list[Block]:
    return [block for path in doc_files() for block in _blocks_of(path)]


def example(name: str) -> Block:
    """The one block named `name`."""
    named = [block for block in blocks() if block.name == name]
    assert len(named) == 1, f"{len(named)} blocks named {name!r}"
    return named[0]


def block_before(name: str, language: str) -> str:
    """The text of the last `language` block before the block named `name`, in the same file (a recipe the
    command uses)."""
    target = example(name)
    earlier = [b for b in _blocks_of(target.file) if b.line < target.line and b.language == language]
    assert earlier, f"no {language} block before {name!r}"
    return earlier[-1].text


def commands(text: str) -> list[list[str]]:
    """A shell block's commands as argument lists: comments dropped, `a && b` split, `x | y` kept as one
    command with a `|` argument between."""
    found = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        current: list[str] = []
        for word in words:
            if word == "&&":
                found.append(current)
                current = []
            else:
                current.append(word)
        if current:
            found.append(current)
    return found


Handler = Callable[[list[str]], bool]


def run_shell(text: str, train_settings: list[str], other: Handler | None = None) -> list[str]:
    """Run a shell block in the current folder; the outputs of its `aflora` commands, in order.

    Substitutions, stated here for every test: `scripts/install.sh` is skipped (the suite runs in the venv it
    made); `.venv/bin/aflora` and `aflora` are the Typer app in this process; `aflora train` gets
    `train_settings` (`--set` pairs making it short) after its own arguments, so they win; `echo TEXT | aflora …`
    passes TEXT on standard input. Any other command goes to `other`, which returns True if it handled it."""
    from typer.testing import CliRunner

    from aflora_cli.cli import app

    outputs = []
    for words in commands(text):
        if words[0] == "scripts/install.sh":
            continue
        stdin = None
        if words[0] == "echo" and "|" in words:
            bar = words.index("|")
            stdin, words = " ".join(words[1:bar]) + "\n", words[bar + 1 :]
        if words[0] in ("aflora", ".venv/bin/aflora"):
            args = words[1:] + (train_settings if words[1] == "train" else [])
            result = CliRunner().invoke(app, args, input=stdin)
            assert result.exit_code == 0, f"{shlex.join(words)}: exit {result.exit_code}\n{result.output[-3000:]}"
            outputs.append(result.output)
        elif other is None or not other(words):
            raise AssertionError(f"no test handles {shlex.join(words)!r}")
    return outputs
