"""`aflora inspect`: summary, freeze timeline, trainable-parameter curve and heat map, from the checkpoint alone."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aflora_cli.cli import app
from aflora_cli.engine import base_model
from trained_checkpoints import (
    BAD_CHECKPOINTS,
    aflora_run,
    assert_user_error,
    bad_checkpoint,
    copy_checkpoint,
    lora_run,
    manifest_of,
)

runner = CliRunner()
WIDE = {"COLUMNS": "200"}


def inspect_json(checkpoint: Path) -> dict:
    result = runner.invoke(app, ["inspect", str(checkpoint), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(autouse=True)
def no_base_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """inspect must not touch the base model: finding or fingerprinting it fails the test."""
    aflora_run(), lora_run()  # train first (that needs the base model)

    def refuse(*args, **kwargs):
        raise AssertionError("inspect looked for the base model")

    monkeypatch.setattr(base_model, "resolve_model_dir", refuse)
    monkeypatch.setattr(base_model, "fingerprint", refuse)


def test_json_matrices_follow_the_freeze_log() -> None:
    checkpoint = aflora_run() / "last"
    manifest = manifest_of(checkpoint)
    report = inspect_json(checkpoint)
    freezing = manifest["freezing"]
    assert (report["total_steps"], report["t_i"], report["t_f"]) == (8, 2, 2)
    keys = ("total_steps", "t_i", "t_f")
    assert [report[key] for key in keys] == [freezing[key] for key in keys]
    assert report["step"] == 8 and report["method"] == "aflora" and report["rank"] == 4

    matrices = report["matrices"]
    targets = {target["name"]: target for target in manifest["targets"]}
    assert sorted(row["name"] for row in matrices) == sorted(f"{t}.lora_{m}" for t in targets for m in "AB")
    frozen_steps = [row["frozen_at_step"] for row in matrices]
    assert frozen_steps == sorted(frozen_steps, key=lambda s: (s is None, s or 0))  # by step, never-frozen last
    for row in matrices:
        target = targets[row["name"].rsplit(".", 1)[0]]
        assert row["kind"] == target["kind"] and row["policy"] == target["policy"]
        match = re.fullmatch(r"bert\.encoder\.layer\.(\d+)\.(.+)\.lora_([AB])", row["name"])
        assert (row["layer"], row["module"], row["matrix"]) == (int(match[1]), match[2], match[3])
        if row["policy"] == "adaptive":
            assert row["frozen_at_step"] == manifest["freeze_log"][row["name"]]
            assert row["score"] == manifest["freeze_scores"][row["name"]]
            if row["frozen_at_step"] is not None:
                assert row["frozen_at_epoch"] == row["frozen_at_step"] / freezing["steps_per_epoch"]
        else:  # policy frozen: the attention PMs of aflora never train
            assert row["policy"] == "frozen" and row["frozen_at_step"] == 0 and row["score"] is None
    adaptive = [row for row in matrices if row["policy"] == "adaptive"]
    assert len(adaptive) == 24 and all(row["module"] in ("intermediate.dense", "output.dense") for row in adaptive)
    assert any(row["frozen_at_step"] is not None for row in adaptive)  # the fixture's run froze some PMs
    # params: A is r x in, B is out x r
    sizes = {
        ("intermediate.dense", "A"): 4 * 384,
        ("intermediate.dense", "B"): 1536 * 4,
        ("output.dense", "A"): 4 * 1536,
        ("output.dense", "B"): 384 * 4,
    }
    assert all(row["params"] == sizes[(row["module"], row["matrix"])] for row in adaptive)

    assert report["trainable_params"] == manifest["trainable_params"]
    assert report["trainable_params"]["average"] == manifest["trainable_params"]["average"]
    assert report["trainable_params"]["by_step"][0]["step"] == 0
    assert report["final_metric"] == {
        "split": "validation",
        "name": "accuracy",
        "value": manifest["metrics"]["validation"]["accuracy"],
    }


def test_json_heatmap_is_fig5() -> None:
    checkpoint = aflora_run() / "last"
    manifest = manifest_of(checkpoint)
    heat = inspect_json(checkpoint)["heatmap"]
    assert heat["layers"] == list(range(6))
    assert heat["columns"] == ["intermediate.dense A", "intermediate.dense B", "output.dense A", "output.dense B"]
    for layer, values in zip(heat["layers"], heat["frozen_at_step"], strict=True):
        for column, value in zip(heat["columns"], values, strict=True):
            module, matrix = column.split()
            assert value == manifest["freeze_log"][f"bert.encoder.layer.{layer}.{module}.lora_{matrix}"]


def test_rich_report_shows_summary_timeline_curve_and_heatmap() -> None:
    checkpoint = aflora_run() / "last"
    manifest = manifest_of(checkpoint)
    result = runner.invoke(app, ["inspect", str(checkpoint)], env=WIDE)
    assert result.exit_code == 0, result.output
    text = result.stdout
    params = manifest["trainable_params"]
    for fragment in (
        "sentence-transformers/all-MiniLM-L6-v2",
        "movie_reviews",
        "aflora, rank 4",
        "8 of 8",
        "t_i = 2, t_f = 2",
        f"{params['start']:,}",
        f"{params['end']:,}",
        f"average {params['average']:,.{0 if float(params['average']).is_integer() else 1}f}",
        f"accuracy {manifest['metrics']['validation']['accuracy']:.4f} on validation",
        "freeze timeline",
        "trainable parameters over training",
        "steps before freezing, per layer",
        "attention PMs (48)",
    ):
        assert fragment in text, fragment
    # the timeline lists the adaptive PMs in the order they froze
    timeline = text[text.index("freeze timeline") : text.index("attention PMs (48)")]
    rows = re.findall(r"│\s+\d+ │\s+(\d) │ (\S+) ([AB])\s+│ ffn\s+│\s+(\d+|never) │", timeline)
    assert len(rows) == 24
    expected = sorted(
        ((int(l), m, x) for l, m, x, _ in rows),
        key=lambda key: (
            manifest["freeze_log"][f"bert.encoder.layer.{key[0]}.{key[1]}.lora_{key[2]}"] is None,
            manifest["freeze_log"][f"bert.encoder.layer.{key[0]}.{key[1]}.lora_{key[2]}"] or 0,
        ),
    )
    assert [(int(l), m, x) for l, m, x, _ in rows] == expected
    for layer, module, matrix, step in rows:
        logged = manifest["freeze_log"][f"bert.encoder.layer.{layer}.{module}.lora_{matrix}"]
        assert step == ("never" if logged is None else str(logged))
    # the curve: one bar row per change point, ending at the checkpoint's step with the final count
    curve = text[text.index("trainable parameters over training") : text.index("steps before freezing")]
    points = re.findall(r"^\s+(\d+)\s+[\d.]+\s+([\d,]+)\s+█*", curve, flags=re.M)
    assert points[0] == ("0", f"{params['start']:,}") and points[-1] == ("8", f"{params['end']:,}")
    # the heat map: a row per layer with the step each PM froze
    heat = text[text.index("steps before freezing, per layer") :]
    for layer in range(6):
        cells = re.search(rf"^\s+{layer}\s+(.*)$", heat, flags=re.M)[1].split()
        values = [
            manifest["freeze_log"][f"bert.encoder.layer.{layer}.{m}.lora_{x}"]
            for m in ("intermediate.dense", "output.dense")
            for x in "AB"
        ]
        assert cells == ["never" if v is None else str(v) for v in values]


def test_lora_checkpoint_has_no_adaptive_pms() -> None:
    checkpoint = lora_run() / "last"
    report = inspect_json(checkpoint)
    assert report["method"] == "lora" and report["scaling"] == 2.0
    assert {row["policy"] for row in report["matrices"]} == {"trainable"}
    assert all(row["frozen_at_step"] is None for row in report["matrices"])
    assert report["heatmap"]["columns"] == []
    assert report["trainable_params"]["average"] == report["trainable_params"]["start"]
    result = runner.invoke(app, ["inspect", str(checkpoint)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "no adaptive PMs" in result.stdout and "trainable the whole run" in result.stdout


def test_inspect_without_metrics_and_without_base_model(tmp_path: Path) -> None:
    """A checkpoint saved between evaluations, whose base model is gone: inspect still reports it."""
    checkpoint = copy_checkpoint(
        aflora_run() / "best", tmp_path / "c", metrics=None, base_model__name_or_path="/nonexistent/base"
    )
    report = inspect_json(checkpoint)
    assert report["final_metric"] is None and report["base_model"]["name_or_path"] == "/nonexistent/base"
    result = runner.invoke(app, ["inspect", str(checkpoint)], env=WIDE)
    assert result.exit_code == 0 and "not evaluated at this checkpoint" in result.stdout


def test_never_frozen_pms_come_last(tmp_path: Path) -> None:
    """A checkpoint saved before every adaptive PM froze: the still-trainable ones sort last, shown as never."""
    still = ["bert.encoder.layer.0.intermediate.dense.lora_A", "bert.encoder.layer.3.output.dense.lora_B"]
    checkpoint = copy_checkpoint(
        aflora_run() / "last",
        tmp_path / "c",
        **{f"freeze_log__{name}": None for name in still},
        **{f"freeze_scores__{name}": None for name in still},
    )
    report = inspect_json(checkpoint)
    assert [row["name"] for row in report["matrices"][-2:]] == still
    assert all(row["frozen_at_step"] is None and row["frozen_at_epoch"] is None for row in report["matrices"][-2:])
    assert report["heatmap"]["frozen_at_step"][0][0] is None and report["heatmap"]["frozen_at_step"][3][3] is None
    text = runner.invoke(app, ["inspect", str(checkpoint)], env=WIDE).stdout
    timeline = text[text.index("freeze timeline") : text.index("attention PMs (48)")]
    assert re.findall(r"(\d) │ (\S+ [AB])\s+│ ffn\s+│\s+never", timeline) == [
        ("0", "intermediate.dense A"),
        ("3", "output.dense B"),
    ]
    heat = text[text.index("steps before freezing, per layer") :]
    assert re.search(r"^\s+0\s+never\s", heat, flags=re.M) and re.search(r"^\s+3\s+(\d+\s+){3}never", heat, flags=re.M)


@pytest.mark.parametrize("kind", BAD_CHECKPOINTS)
def test_inspect_bad_checkpoint_is_one_clear_line(kind: str, tmp_path: Path) -> None:
    checkpoint = bad_checkpoint(kind, aflora_run() / "best", tmp_path)
    assert_user_error(runner.invoke(app, ["inspect", str(checkpoint)]), str(checkpoint))


def test_bad_checkpoint_in_a_real_process(tmp_path: Path) -> None:
    """The installed entry point: exit code 2, one line naming the path, no traceback."""
    checkpoint = bad_checkpoint("manifest not JSON", aflora_run() / "best", tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "aflora_cli", "inspect", str(checkpoint)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(checkpoint) in lines[0], done.stderr
    assert "Traceback" not in done.stderr
