"""Run a program under torchrun with CPU processes (gloo), as the multi-process tests do."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(processes: int, program: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """`program` (`-m module ...` or `script ...`) under torchrun with `processes` CPU processes; with `check`, it
    must succeed."""
    tests = str(Path(__file__).resolve().parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests, env.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(processes),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *program,
    ]  # fmt: skip
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            # torchrun stops its workers on SIGTERM (each runs in a session of its own, out of reach of a kill
            # of torchrun alone), escalating to SIGKILL for one that does not stop, so none is left behind
            process.terminate()
            try:
                process.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert result.returncode == 0 or not check, result.stderr[-3000:]
    return result
