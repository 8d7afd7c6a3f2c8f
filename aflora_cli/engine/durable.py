"""Writing files so that a kill or a power loss at any instant leaves either the old or the new version:
fsync before rename, renames that a Ctrl-C cannot split, and whether the process that left a file still runs."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

# the signals a user or a scheduler sends to stop a run; SIGUSR1 is what SLURM's --signal usually names
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, then every directory in it, `folder` itself last."""
    folders = [folder]
    for root, dirs, files in os.walk(folder):
        for name in files:
            fsync_path(Path(root) / name)
        folders.extend(Path(root) / name for name in dirs)
    for path in reversed(folders):
        fsync_path(path)


def write_text_durably(path: Path, text: str) -> None:
    """Replace `path` by `text`: written beside it, flushed, renamed over it, the rename flushed."""
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with partial.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    with uninterrupted():
        partial.replace(path)
        fsync_path(path.parent)


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold back SIGINT, SIGTERM and SIGUSR1 (a Ctrl-C's KeyboardInterrupt included) while a few renames run;
    they are handled right after, as they would have been. (Only the main thread sets handlers: elsewhere this
    holds nothing back.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[tuple[int, FrameType | None]] = []
    previous: dict[int, Any] = {}
    for signum in STOP_SIGNALS:
        previous[signum] = signal.signal(signum, lambda signum, frame: held.append((signum, frame)))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        for signum, frame in held:
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)  # its default action (ending the process), now that it is safe


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True
