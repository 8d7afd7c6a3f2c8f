"""Shared test setup: make the repo importable without installing it, and `tiny_models` beside the tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from aflora_cli.tasks.encoded_cache import CACHE_ENV  # noqa: E402  (after the path is set)


@pytest.fixture(autouse=True, scope="session")
def _encoded_rows_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Encoded rows are cached in a folder of the test session's own, never the user's ~/.cache."""
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("encoded-rows-cache"))
