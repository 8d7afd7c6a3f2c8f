"""A benchmark pool whose one run never finishes, for the test that stops its parent: each worker writes its
process id to the file named on the command line, then sleeps."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from at_scale import run_pool


def _sleep_forever(run: Any, work: Path) -> dict[str, Any]:
    Path(run).write_text(str(os.getpid()))
    time.sleep(3600)
    raise AssertionError("the parent was meant to stop first")


def _plan(records: list[dict[str, Any]]) -> list[str]:
    return [sys.argv[1]]


if __name__ == "__main__":
    run_pool(Path(sys.argv[2]), _plan, _sleep_forever, str, jobs=1, threads=1)
