"""One writer per output_dir: `aflora train` holds `<output_dir>/.aflora.lock` (pid, host, start time) while it
runs; a second run on the same folder is refused in one line, and the lock of a run that was killed is taken
over. Under DDP only rank 0 takes it: the other ranks write nothing of their own in output_dir."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from aflora_cli.engine.durable import pid_alive
from aflora_cli.errors import AfloraError

LOCK_FILE = ".aflora.lock"


class OutputLock:
    """The lock of one output_dir, held from `acquire()` until `release()` (or the process's end)."""

    def __init__(self, output_dir: Path) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        """Take the lock, taking over one whose process is gone; refuse if a live run holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        partial = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}")
        partial.write_text(json.dumps(mine) + "\n", encoding="utf-8")
        try:
            for _ in range(3):
                try:
                    os.link(partial, self.path)  # atomic, and fails if the lock exists: never a half-written lock
                    self.held = True
                    return
                except FileExistsError:
                    holder = self._holder()
                    if holder is not None and self._alive(holder):
                        raise AfloraError(
                            f"output_dir {self.path.parent} is in use by another aflora train (pid {holder['pid']} "
                            f"on {holder['host']}, started {holder['started']}); wait for it to end or choose "
                            f"another output_dir (if no such run is alive, delete {self.path})"
                        ) from None
                    self.path.unlink(missing_ok=True)  # left by a run that was killed: take it over
            raise AfloraError(f"output_dir {self.path.parent}: could not take the lock {self.path}; try again")
        finally:
            partial.unlink(missing_ok=True)

    def _holder(self) -> dict[str, Any] | None:
        """What the lock says, or None if it vanished or cannot be read (then it is not a live run's)."""
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None

    @staticmethod
    def _alive(holder: dict[str, Any]) -> bool:
        if holder.get("host") != socket.gethostname():
            return True  # a process on another machine cannot be checked from here: assume it runs
        return holder["pid"] != os.getpid() and pid_alive(holder["pid"])

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
