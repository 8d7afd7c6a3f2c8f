"""Faults a run survives: a kill at every step of a save, a full or read-only disk, corrupt files, two writers,
a graceful stop on SIGTERM/SIGINT, a diverged run. Each is injected for real (a SIGKILL, an OSError at a named
write, bytes changed on disk, a signal) and what is left is read back."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from aflora_cli.cli import app
from aflora_cli.engine import faults
from aflora_cli.engine.checkpoint import find_checkpoint, read_weights, restore, save_checkpoint
from aflora_cli.engine.config import AdapterConfig
from aflora_cli.engine.inject import inject_adapters, unfreeze_head
from aflora_cli.engine.manifest import (
    CHECKSUMS_KEY,
    STATE_FILE,
    WEIGHTS_FILE,
    read_manifest,
    verify_checksums,
)
from aflora_cli.errors import AfloraError
from aflora_cli.training.output_lock import LOCK_FILE, OutputLock
from aflora_cli.training.trainer import METRICS_FILE, Trainer, TrainingStopped
from runs import quick_recipe, recipe_of, run, write_recipe
from tiny_models import tiny_bert
from trained_checkpoints import aflora_run, assert_user_error, copy_checkpoint

TESTS = Path(__file__).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(TESTS)}


def _adapted(seed: int):
    model = tiny_bert(0)
    torch.manual_seed(seed)
    inject_adapters(model, AdapterConfig(method="aflora", rank=4))
    return model, unfreeze_head(model)


def _extra(folder: Path) -> None:
    torch.save({"step": 1}, folder / STATE_FILE)


# a separate process saves checkpoint n=1, then n=2 with AFLORA_FAULT set: a SIGKILL at the named point
_SAVER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from aflora_cli.engine.checkpoint import save_checkpoint
    from aflora_cli.engine.config import AdapterConfig
    from aflora_cli.engine.inject import inject_adapters, unfreeze_head
    from tiny_models import tiny_bert

    model = tiny_bert(0)
    inject_adapters(model, AdapterConfig(method="aflora", rank=4))
    head = unfreeze_head(model)
    extra = lambda folder: torch.save({"n": 1}, folder / "training_state.pt")
    save_checkpoint(Path(sys.argv[1]), model, head, {"n": 1}, extra=extra)
    import os
    os.environ["AFLORA_FAULT"] = sys.argv[2]
    save_checkpoint(Path(sys.argv[1]), model, head, {"n": 2}, extra=extra)
    """
)


@pytest.mark.parametrize("point", faults.POINTS)
def test_a_kill_at_any_step_of_a_save_leaves_a_complete_checkpoint(tmp_path: Path, point: str) -> None:
    """SIGKILL at each step of a save: a complete, checksum-true checkpoint is always found (the new one once it
    is renamed into place, else the old one or its predecessor), and the next save clears the leftovers."""
    final = tmp_path / "last"
    done = subprocess.run(
        [sys.executable, "-c", _SAVER, str(final), f"{point}:kill"], env=ENV, capture_output=True, text=True
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    found = find_checkpoint(final)
    assert found is not None
    manifest = read_manifest(found)
    assert manifest["n"] == (2 if point == "renamed" else 1)
    assert found == final if point != "moved_old" else found.name.startswith(".last.old-")
    verify_checksums(found, manifest)
    assert set(read_weights(found)) and torch.load(found / STATE_FILE, weights_only=True) == {"n": 1}
    assert restore(final) == final and read_manifest(final)["n"] == manifest["n"]
    model, head = _adapted(1)
    save_checkpoint(final, model, head, {"n": 3})
    assert [p.name for p in tmp_path.iterdir()] == ["last"]  # leftovers of the killed writer are gone


@pytest.mark.parametrize("action", ["enospc", "eacces"])
@pytest.mark.parametrize("point", faults.POINTS[:-1])
def test_a_full_or_read_only_disk_at_any_write_is_one_error_and_the_old_checkpoint_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str, action: str
) -> None:
    final = tmp_path / "last"
    model, head = _adapted(0)
    save_checkpoint(final, model, head, {"n": 1}, extra=_extra)
    before = {p.name: p.read_bytes() for p in final.iterdir()}
    monkeypatch.setattr(faults, "_hits", {})
    monkeypatch.setenv(faults.FAULT_VARIABLE, f"{point}:{action}")
    with pytest.raises(AfloraError) as caught:
        save_checkpoint(final, *_adapted(1), {"n": 2}, extra=_extra)
    message = str(caught.value)
    strerror = os.strerror(28 if action == "enospc" else 13)
    assert message == f"could not write the checkpoint {final}: {strerror}; {final} still holds the previous checkpoint"
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["last"]


def test_checksums_find_a_truncated_empty_or_altered_file_and_old_checkpoints_still_open(tmp_path: Path) -> None:
    final = tmp_path / "ckpt"
    model, head = _adapted(0)
    save_checkpoint(final, model, head, {"n": 1}, extra=_extra)
    manifest = read_manifest(final)
    assert set(manifest[CHECKSUMS_KEY]) == {WEIGHTS_FILE, STATE_FILE}
    verify_checksums(final, manifest)
    for name in (WEIGHTS_FILE, STATE_FILE):
        good = (final / name).read_bytes()
        flipped = bytearray(good)
        flipped[len(good) // 2] ^= 0x01
        for bad, what in ((good[: len(good) - 7], "damaged"), (b"", "empty"), (bytes(flipped), "damaged")):
            (final / name).write_bytes(bad)
            with pytest.raises(AfloraError, match=rf"^{final / name}: {what}"):
                verify_checksums(final, manifest)
        (final / name).write_bytes(good)
    del manifest[CHECKSUMS_KEY]  # as written before checksums were recorded
    (final / STATE_FILE).write_bytes(b"")
    verify_checksums(final, manifest)


@pytest.mark.parametrize("command", ["inspect", "eval", "generate", "merge"])
def test_commands_name_a_damaged_weights_file_in_one_line(tmp_path: Path, command: str) -> None:
    checkpoint = copy_checkpoint(aflora_run() / "best", tmp_path / "ckpt")
    weights = checkpoint / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10  # one bit in the last tensor's data: the safetensors header still reads
    weights.write_bytes(bytes(data))
    args = {"generate": ["--prompt", "hi"], "merge": ["--out", str(tmp_path / "merged")]}.get(command, [])
    result = CliRunner().invoke(app, [command, str(checkpoint), *args])
    assert_user_error(result, f"{weights}: damaged", "do not match the manifest's checksum")
    assert not (tmp_path / "merged").exists()


def test_a_second_writer_is_refused_and_a_dead_ones_lock_taken_over(tmp_path: Path) -> None:
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    try:
        lock_file = tmp_path / LOCK_FILE
        holder = {"pid": live.pid, "host": socket.gethostname(), "started": "2026-12-06T01:00:00+0000"}
        lock_file.write_text(json.dumps(holder))
        with pytest.raises(AfloraError, match=rf"in use by another aflora train \(pid {live.pid} on "):
            OutputLock(tmp_path).acquire()
        lock_file.write_text(json.dumps({**holder, "pid": int(dead.stdout)}))
        lock = OutputLock(tmp_path)
        lock.acquire()
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
        lock.release()
        assert not lock_file.exists()
    finally:
        live.kill()
        live.wait()


def test_train_refuses_an_output_dir_another_run_writes(tmp_path: Path) -> None:
    raw = quick_recipe(tmp_path / "run", training={"max_steps": 2})
    run(raw)
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released at the end
    metrics = (tmp_path / "run" / METRICS_FILE).read_bytes()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = {"pid": live.pid, "host": socket.gethostname(), "started": "2026-12-06T01:00:00+0000"}
        (tmp_path / "run" / LOCK_FILE).write_text(json.dumps(holder))
        recipe = write_recipe(tmp_path / "recipe.yaml", raw)
        result = CliRunner().invoke(app, ["train", str(recipe), "--resume"])
        assert_user_error(result, f"output_dir {tmp_path / 'run'} is in use by another aflora train (pid {live.pid}")
    finally:
        live.kill()
        live.wait()
    assert (tmp_path / "run" / METRICS_FILE).read_bytes() == metrics


def _same_run(a: Path, b: Path) -> None:
    """Bit-identical adapter weights, the same freeze log and the same metrics.jsonl."""
    wa, wb = load_file(str(a / "last" / WEIGHTS_FILE)), load_file(str(b / "last" / WEIGHTS_FILE))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = read_manifest(a / "last"), read_manifest(b / "last")
    assert ma["freeze_log"] == mb["freeze_log"] and ma["step"] == mb["step"]
    assert (a / METRICS_FILE).read_text() == (b / METRICS_FILE).read_text()


SETTINGS = {"training": {"max_steps": 10, "save_every": 4, "eval_every": 5}, "freezing": {"t_i": 2, "t_f": 3}}


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every interrupted one must end exactly like."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run(quick_recipe(out, **SETTINGS))
    return out


def test_sigterm_finishes_the_step_saves_last_and_resuming_ends_bit_identical(tmp_path: Path, straight: Path) -> None:
    raw = quick_recipe(tmp_path / "run", **SETTINGS)

    def term_at_step_6(kind: str, record: dict) -> None:
        if kind == "step" and record["step"] == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer = Trainer(recipe_of(raw), on_event=term_at_step_6)
    trainer.prepare()
    with pytest.raises(TrainingStopped) as stopped:
        trainer.train()
    trainer.close()
    assert (stopped.value.step, stopped.value.exit_code) == (6, 143)
    assert read_manifest(tmp_path / "run" / "last")["step"] == 6  # not 4, the last periodic save
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
    assert run(raw, resume=True).step == 10
    _same_run(straight, tmp_path / "run")


def test_a_second_ctrl_c_aborts_at_once_and_last_stays_whole(tmp_path: Path) -> None:
    raw = quick_recipe(tmp_path / "run", **SETTINGS)

    def two_ctrl_c_at_step_5(kind: str, record: dict) -> None:
        if kind == "step" and record["step"] == 5:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    trainer = Trainer(recipe_of(raw), on_event=two_ctrl_c_at_step_5)
    trainer.prepare()
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.close()
    last = tmp_path / "run" / "last"
    assert read_manifest(last)["step"] == 4
    verify_checksums(last, read_manifest(last))


def test_a_kill_between_the_renames_of_a_save_resumes_from_the_predecessor(tmp_path: Path, straight: Path) -> None:
    """`aflora train` SIGKILLed while `last` is renamed aside at its second save (step 8): `--resume` finds the
    predecessor (step 4) and ends exactly like the uninterrupted run."""
    raw = quick_recipe(tmp_path / "run", **SETTINGS)
    recipe = write_recipe(tmp_path / "recipe.yaml", raw)
    command = [sys.executable, "-m", "aflora_cli", "train", str(recipe)]
    killed = subprocess.run(command, env={**ENV, faults.FAULT_VARIABLE: "moved_old#1:kill"}, capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    out = tmp_path / "run"
    assert not (out / "last").exists() and (out / LOCK_FILE).exists()
    predecessor = find_checkpoint(out / "last")
    assert predecessor is not None and read_manifest(predecessor)["step"] == 4
    resumed = subprocess.run([*command, "--resume"], env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    _same_run(straight, out)
    assert sorted(p.name for p in out.iterdir()) == ["best", "last", METRICS_FILE]


@pytest.mark.parametrize(
    ("stop", "status"),
    [(signal.SIGTERM, 143), (signal.SIGUSR1, 138)],  # SIGUSR1: what SLURM's `--signal=USR1@120` sends
    ids=["SIGTERM", "SIGUSR1"],
)
def test_cli_stop_signal_exits_with_its_status_and_one_line_telling_how_to_resume(
    tmp_path: Path, stop: signal.Signals, status: int
) -> None:
    raw = quick_recipe(tmp_path / "run", training={"max_steps": 400, "log_every": 1})
    recipe = write_recipe(tmp_path / "recipe.yaml", raw)
    process = subprocess.Popen(
        [sys.executable, "-m", "aflora_cli", "train", str(recipe)],
        env={**ENV, "COLUMNS": "400"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "run" / METRICS_FILE
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)  # not a busy wait: the run needs the core
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == status
    step = read_manifest(tmp_path / "run" / "last")["step"]
    assert 2 <= step < 400
    assert stderr.strip().splitlines()[-1] == (
        f"stopped by {stop.name} at step {step}: `aflora train {recipe} --resume` continues from "
        f"{tmp_path / 'run'}/last"
    )
    assert "Traceback" not in stderr


def test_a_diverged_run_stops_in_one_line_and_last_holds_a_finite_state(tmp_path: Path) -> None:
    raw = quick_recipe(tmp_path / "run", training={"max_steps": 12, "save_every": 4, "max_nonfinite_steps": 3})
    trainer = Trainer(recipe_of(raw))
    trainer.prepare()
    calls = {"n": 0}

    def poison_from_step_6(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return output * float("nan") if calls["n"] >= 6 else output

    trainer.model.classifier.register_forward_hook(poison_from_step_6)
    with pytest.raises(AfloraError) as caught:
        trainer.train()
    trainer.close()
    lr = trainer.scheduler.get_last_lr()[0]
    assert str(caught.value).startswith("training diverged at step 8 (lr ")
    assert f"3 non-finite steps in a row; {tmp_path / 'run' / 'last'} holds step 4" in str(caught.value)
    assert lr > 0
    last = tmp_path / "run" / "last"
    assert read_manifest(last)["step"] == 4
    assert all(torch.isfinite(t).all() for t in read_weights(last).values())
    with torch.no_grad():  # weights that overflowed are never saved either
        trainer.steps.trainable[0].fill_(float("inf"))
    with pytest.raises(AfloraError, match=r"training diverged at step 8 .*the trainable weights are not finite"):
        trainer._save(None, save_last=True)
    assert read_manifest(last)["step"] == 4


def test_a_full_disk_during_a_save_of_train_is_one_line_and_the_run_resumes_to_the_same_end(
    tmp_path: Path, straight: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while the manifest of the step-8 `last` is written: exit 2 with one line, `last` still the step-4
    checkpoint; `--resume` then ends exactly like the uninterrupted run."""
    raw = quick_recipe(tmp_path / "run", **SETTINGS)
    recipe = write_recipe(tmp_path / "recipe.yaml", raw)
    monkeypatch.setattr(faults, "_hits", {})
    monkeypatch.setenv(faults.FAULT_VARIABLE, "manifest#3:enospc")  # saves: last@4, best@5, last@8
    last = tmp_path / "run" / "last"
    assert_user_error(
        CliRunner().invoke(app, ["train", str(recipe)]),
        f"could not write the checkpoint {last}: {os.strerror(28)}; {last} still holds the previous checkpoint",
    )
    assert read_manifest(last)["step"] == 4
    monkeypatch.delenv(faults.FAULT_VARIABLE)
    assert CliRunner().invoke(app, ["train", str(recipe), "--resume"]).exit_code == 0
    _same_run(straight, tmp_path / "run")
