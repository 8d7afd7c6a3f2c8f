"""Fault injection for tests and the fault benchmark: `AFLORA_FAULT=POINT[#N]:ACTION` makes the N-th time
(default the first) this process reaches the named point of a checkpoint write do ACTION.

Points, in the order a save reaches them: `weights`, `extra`, `manifest` (before each file is written),
`fsync` (files written, before they are synced), `moved_old` (the previous folder renamed away, the new one
not yet in place), `renamed` (the new folder in place, its predecessor not yet removed).
Actions: `kill` (SIGKILL itself), `enospc` / `eacces` (raise that OSError), `sleep=SECONDS`.
Unset (as always outside tests), a point costs one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal
import time

FAULT_VARIABLE = "AFLORA_FAULT"
POINTS = ("weights", "extra", "manifest", "fsync", "moved_old", "renamed")
_hits: dict[str, int] = {}


def fault_point(point: str) -> None:
    """Do what AFLORA_FAULT asks at `point`, if it names this point and this hit."""
    spec = os.environ.get(FAULT_VARIABLE)
    if not spec:
        return
    where, _, action = spec.partition(":")
    name, _, nth = where.partition("#")
    if name != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] != int(nth or 1):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # SIGKILL is delivered at once; never go on writing
    elif action in ("enospc", "eacces"):
        code = errno.ENOSPC if action == "enospc" else errno.EACCES
        raise OSError(code, os.strerror(code), f"<{point}>")
    elif action.startswith("sleep="):
        time.sleep(float(action.removeprefix("sleep=")))
