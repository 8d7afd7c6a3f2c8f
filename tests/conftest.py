"""Shared test setup: make the repo importable without installing it, and `tiny_models` beside the tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# pytest-xdist starts its workers with COLUMNS=80 (and LINES): the CLI's consoles, made when it is imported, would
# keep that width for the whole worker, so tests that give their own COLUMNS would see other line breaks than in
# one process. Without it, each console reads the width a test sets, as it does when pytest runs alone.
for name in ("COLUMNS", "LINES"):
    os.environ.pop(name, None)

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from aflora_cli.commands.sweep.pool import thread_share  # noqa: E402  (after the path is set; imports no torch)

# Each xdist worker gets its share of the cores for torch's threads, and so does every process it starts (torch
# reads OMP_NUM_THREADS when it loads, before this file could call set_num_threads). Two workers each running
# torch's default of one thread per core oversubscribe the cores, and OpenMP's spinning threads then slowed a
# real-model test 4.8x against a run alone.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(thread_share(_workers)))

from aflora_cli.tasks.encoded_cache import CACHE_ENV  # noqa: E402  (after the path is set)

# The modules of minute-long runs (a real model learning, several processes), longest first as measured with
# `pytest --durations=0` on 2 cores. They go to the workers before every other module (pyproject's addopts keep
# this order with --no-loadscope-reorder), so that the workers end together on short modules instead of one
# running a long module alone at the end.
LONG_MODULES = (
    "test_faults.py",
    "test_distributed.py",
    "test_train.py",
    "test_fsdp.py",
    "test_hf_callback.py",
    "test_benchmarks.py",
    "test_smollm2.py",
    "test_sweep.py",
    "test_python_api_docs.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Long modules first, longest first; the rest in their usual order (a stable sort keeps each module whole)."""
    rank = {name: number for number, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_MODULES)))


@pytest.fixture(autouse=True, scope="session")
def _encoded_rows_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Encoded rows are cached in a folder of the test session's own, never the user's ~/.cache."""
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("encoded-rows-cache"))
