"""`aflora inspect CKPT --plot FILE`: the figure's data equals the checkpoint's freeze log, counts and run log;
the image is a real PNG or SVG, written atomically; bad output paths are one clear line."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from aflora_cli.cli import app
from aflora_cli.commands import plotting
from aflora_cli.commands.inspection import inspect_checkpoint, weight_shapes
from aflora_cli.engine import base_model
from aflora_cli.errors import AfloraError
from aflora_cli.training import trainer
from trained_checkpoints import aflora_run, assert_user_error, copy_checkpoint, lora_run, manifest_of

runner = CliRunner()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MODULES = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


@pytest.fixture(autouse=True)
def no_base_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plotting reads only the checkpoint (and its run's log): finding the base model fails the test."""
    aflora_run(), lora_run()  # train first (that needs the base model)

    def refuse(*args, **kwargs):
        raise AssertionError("the plot looked for the base model")

    monkeypatch.setattr(base_model, "resolve_model_dir", refuse)
    monkeypatch.setattr(base_model, "fingerprint", refuse)


def data_of(checkpoint: Path) -> dict:
    return plotting.checkpoint_figure_data(inspect_checkpoint(checkpoint))


def at(points: list[dict], step: int, key: str):
    """The value of a change-point series at `step`."""
    value = None
    for point in points:
        if point["step"] <= step:
            value = point[key]
    return value


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


# -------------------------------------------------------------------------------------------------- data


def test_grid_has_every_pm_with_its_freezing_step_or_policy() -> None:
    checkpoint = aflora_run() / "last"
    manifest = manifest_of(checkpoint)
    grid = data_of(checkpoint)["grid"]
    assert grid["layers"] == list(range(6))
    assert grid["kinds"] == [f"{module} {matrix}" for module in MODULES for matrix in "AB"]
    policies = {target["name"]: target["policy"] for target in manifest["targets"]}
    assert set(policies.values()) == {"adaptive", "frozen"}
    cells = 0
    for kind, row in zip(grid["kinds"], grid["cells"], strict=True):
        module, matrix = kind.split()
        for layer, cell in zip(grid["layers"], row, strict=True):
            target = f"bert.encoder.layer.{layer}.{module}"
            name = f"{target}.lora_{matrix}"
            policy = policies[target]
            expected = manifest["freeze_log"][name] if policy == "adaptive" else 0
            assert cell == {"name": name, "policy": policy, "frozen_at_step": expected}
            cells += 1
    assert cells == 2 * len(manifest["targets"]) == 72
    # the attention PMs are frozen at their initial values, the FFN PMs froze during the run
    assert {cell["policy"] for row in grid["cells"][:8] for cell in row} == {"frozen"}
    assert any(cell["frozen_at_step"] for row in grid["cells"][8:] for cell in row)


def test_lora_grid_is_all_trainable() -> None:
    grid = data_of(lora_run() / "last")["grid"]
    assert all(
        cell["policy"] == "trainable" and cell["frozen_at_step"] is None for row in grid["cells"] for cell in row
    )


def test_schedule_planned_is_eq5_and_actual_is_the_freeze_log() -> None:
    run = aflora_run()
    manifest = manifest_of(run / "last")
    schedule = data_of(run / "last")["schedule"]
    assert (schedule["adaptive_pms"], schedule["units"], schedule["pms_per_unit"], schedule["power"]) == (24, 24, 1, 3)
    # T = 8, t_i = t_f = 2: r(t) = 1 - (1 - (t - 2) / 4)^3 for 2 <= t < 6, and floor(r(t) * 24) by hand:
    # t = 3: 1 - 0.75^3 = 0.578125 -> 13; t = 4: 1 - 0.5^3 = 0.875 -> 21; t = 5: 1 - 0.25^3 = 0.984375 -> 23
    hand = {0: 0, 1: 0, 2: 0, 3: 13, 4: 21, 5: 23, 6: 24, 7: 24}
    assert {t: at(schedule["planned"], t, "frozen") for t in range(8)} == hand
    logged = [step for step in manifest["freeze_log"].values() if step is not None]
    for t in range(8):
        assert at(schedule["actual"], t, "frozen") == sum(step <= t for step in logged)
    assert schedule["actual"] == schedule["planned"]  # the engine freezes exactly floor(r(t) N)
    # the trainer's own count: a step record at step s holds the PMs frozen by optimizer step s - 1
    for record in read_log(run):
        if "frozen_pms" in record:
            assert at(schedule["actual"], record["step"] - 1, "frozen") == record["frozen_pms"]


def test_schedule_reads_the_power_setting(tmp_path: Path) -> None:
    checkpoint = copy_checkpoint(aflora_run() / "last", tmp_path / "c", freezing__power=2)
    planned = data_of(checkpoint)["schedule"]["planned"]
    # r(t) = 1 - (1 - (t - 2) / 4)^2: t = 3 -> 0.4375 * 24 = 10.5; t = 4 -> 0.75 * 24 = 18; t = 5 -> 22.5
    assert [at(planned, t, "frozen") for t in range(8)] == [0, 0, 0, 10, 18, 22, 24, 24]
    assert plotting.planned_frozen(3, 8, 2, 2, 24) == 13  # the cubic default


def test_schedule_counts_pms_of_units_frozen_together(tmp_path: Path) -> None:
    """With `granularity: together` a unit is the A and B of one module: N = 12 units, 2 PMs each."""
    checkpoint = copy_checkpoint(aflora_run() / "last", tmp_path / "c", freezing__granularity="together")
    schedule = data_of(checkpoint)["schedule"]
    assert (schedule["adaptive_pms"], schedule["units"], schedule["pms_per_unit"]) == (24, 12, 2)
    # floor(r(t) * 12) units: t = 3 -> 6, t = 4 -> 10, t = 5 -> 11; twice as many PMs
    assert [at(schedule["planned"], t, "frozen") for t in range(8)] == [0, 0, 0, 12, 20, 22, 24, 24]


def test_trainable_steps_average_and_lora_count() -> None:
    checkpoint = aflora_run() / "last"
    params = manifest_of(checkpoint)["trainable_params"]
    trainable = data_of(checkpoint)["trainable"]
    assert trainable["by_step"] == [{"step": p["step"], "trainable": p["trainable"]} for p in params["by_step"]]
    assert trainable["end"] == 8 and trainable["average"] == params["average"]
    # a LoRA of rank 4 on the same modules: r * (in + out) from the safetensors shapes
    by_hand = 0
    with safe_open(str(checkpoint / "adapter_model.safetensors"), framework="pt") as weights:
        for name in weights.keys():  # noqa: SIM118
            if name.endswith(".lora_A"):
                rank, fan_in = weights.get_slice(name).get_shape()
                fan_out, _ = weights.get_slice(name.replace(".lora_A", ".lora_B")).get_shape()
                by_hand += rank * (fan_in + fan_out)
    assert trainable["lora"] == by_hand == 6 * (4 * 4 * (384 + 384) + 4 * (384 + 1536) + 4 * (1536 + 384))
    assert params["start"] < by_hand  # AFLoRA trains less than LoRA from its first step (attention PMs frozen)
    lora = lora_run() / "last"
    assert data_of(lora)["trainable"]["lora"] == manifest_of(lora)["trainable_params"]["start"]


def test_lora_params_names_a_missing_tensor() -> None:
    shapes = weight_shapes(aflora_run() / "last")
    del shapes["bert.encoder.layer.2.output.dense.lora_B"]
    with pytest.raises(AfloraError, match=r"bert\.encoder\.layer\.2\.output\.dense"):
        plotting.lora_params(shapes, ["bert.encoder.layer.2.output.dense"], 4)


def test_training_series_are_the_run_log() -> None:
    run = aflora_run()
    data = data_of(run / "last")
    records = read_log(run)
    assert plotting.METRICS_FILE == trainer.METRICS_FILE
    training = data["training"]
    assert training["source"] == str((run / "metrics.jsonl").resolve())
    loss = [{"step": r["step"], "loss": r["loss"]} for r in records if "loss" in r and "event" not in r]
    assert training["loss"] == loss and loss
    metric = [{"step": r["step"], "value": r["eval"]["validation"]["accuracy"]} for r in records if "eval" in r]
    assert training["metric"] == {"name": "accuracy", "split": "validation", "points": metric}
    assert metric[-1] == {"step": 8, "value": manifest_of(run / "last")["metrics"]["validation"]["accuracy"]}
    assert json.loads(json.dumps(data)) == data  # plain data


def test_without_a_run_log_there_is_no_training_data(tmp_path: Path) -> None:
    checkpoint = copy_checkpoint(aflora_run() / "last", tmp_path / "c")
    assert data_of(checkpoint)["training"] is None


# ------------------------------------------------------------------------------------------------ images


def test_png_through_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "run.png"
    result = runner.invoke(app, ["inspect", str(aflora_run() / "last"), "--plot", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == f"wrote the figure to {out}"
    assert "freeze timeline" in result.stdout  # the report is still printed
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 50_000
    assert os.listdir(tmp_path) == ["run.png"]  # no temporary file left behind
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # not the temporary file's private mode


@pytest.mark.parametrize("run", ["aflora", "lora"])
def test_svg_through_the_cli(run: str, tmp_path: Path) -> None:
    """An SVG for the aflora run (fixed and adaptive PMs) and for a copy without its run log (lora, trainable)."""
    checkpoint = aflora_run() / "last" if run == "aflora" else copy_checkpoint(lora_run() / "last", tmp_path / "c")
    out = tmp_path / "run.SVG"
    result = runner.invoke(app, ["inspect", str(checkpoint), "--plot", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["method"] == run  # stdout stays JSON; the note goes to stderr
    assert result.stderr.strip() == f"wrote the figure to {out}"
    root = ET.parse(out).getroot()
    assert root.tag.endswith("svg")
    text = out.read_text(encoding="utf-8")
    assert ("Training loss" in text) == (run == "aflora")


def test_plot_replaces_an_existing_file(tmp_path: Path) -> None:
    out = tmp_path / "run.png"
    out.write_bytes(b"old")
    result = runner.invoke(app, ["inspect", str(aflora_run() / "best"), "--plot", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(PNG_SIGNATURE)


def test_a_failed_write_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    def half_then_fail(self, stream, **kwargs):
        stream.write(PNG_SIGNATURE)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_then_fail)
    out = tmp_path / "run.png"
    result = runner.invoke(app, ["inspect", str(aflora_run() / "last"), "--plot", str(out), "--json"])
    assert_user_error(result, str(out), "No space left on device")
    assert list(tmp_path.iterdir()) == []


def _bad_output(case: str, tmp_path: Path) -> Path:
    if case == "jpg":
        return tmp_path / "run.jpg"
    if case == "no extension":
        return tmp_path / "run"
    if case == "missing directory":
        return tmp_path / "missing" / "run.png"
    if case == "directory":
        (tmp_path / "run.png").mkdir()
        return tmp_path / "run.png"
    return _unwritable(tmp_path)


def _unwritable(tmp_path: Path) -> Path:
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.access(folder, os.W_OK):
        folder.chmod(stat.S_IRWXU)
        pytest.skip("running as a user who can write anywhere (root)")
    return folder / "run.png"


@pytest.mark.parametrize("case", ["jpg", "no extension", "missing directory", "unwritable directory", "directory"])
def test_bad_plot_path_is_one_line_and_writes_nothing(case: str, tmp_path: Path) -> None:
    out = _bad_output(case, tmp_path)
    before = sorted(tmp_path.rglob("*"))
    try:
        result = runner.invoke(app, ["inspect", str(aflora_run() / "last"), "--plot", str(out)])
        assert_user_error(result, str(out))
        assert result.stdout == ""  # refused before the report is printed
        assert sorted(tmp_path.rglob("*")) == before
    finally:
        if case == "unwritable directory":
            out.parent.chmod(stat.S_IRWXU)


def test_damaged_run_log_is_one_line(tmp_path: Path) -> None:
    checkpoint = copy_checkpoint(aflora_run() / "last", tmp_path / "run" / "last")
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo\n', encoding="utf-8")
    out = tmp_path / "run.png"
    result = runner.invoke(app, ["inspect", str(checkpoint), "--plot", str(out), "--json"])
    assert_user_error(result, "metrics.jsonl", "line 2")
    assert not out.exists()


def test_damaged_power_is_one_line(tmp_path: Path) -> None:
    checkpoint = copy_checkpoint(aflora_run() / "last", tmp_path / "c", freezing__power="cubic")
    result = runner.invoke(app, ["inspect", str(checkpoint), "--plot", str(tmp_path / "run.png"), "--json"])
    assert_user_error(result, "freezing.power")
    assert not (tmp_path / "run.png").exists()


def test_without_matplotlib_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "run.png"
    result = runner.invoke(app, ["inspect", str(aflora_run() / "last"), "--plot", str(out)])
    line = assert_user_error(result, "pip install 'aflora[plot]'")
    assert "matplotlib" in line and not out.exists()


def test_matplotlib_is_loaded_only_for_plots() -> None:
    checkpoint = aflora_run() / "last"
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from aflora_cli.cli import app\n"
        "runner = CliRunner()\n"
        "assert runner.invoke(app, ['--help']).exit_code == 0\n"
        f"assert runner.invoke(app, ['inspect', {str(checkpoint)!r}]).exit_code == 0\n"
        "print('matplotlib' in sys.modules)\n"
    )
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_unwritable_directory_even_as_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The same refusal where the permission test is skipped (root writes anywhere): os.access says no."""
    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and access(path, mode, **kw))
    result = runner.invoke(app, ["inspect", str(aflora_run() / "last"), "--plot", str(locked / "run.png")])
    assert_user_error(result, "not writable", str(locked))
    assert list(locked.iterdir()) == []
