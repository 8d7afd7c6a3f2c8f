"""`aflora sweep`: a tiny-model sweep end to end (runs side by side, killed and resumed, report and picture), the
results a scheduler's jobs leave behind, the one-line errors before anything trains, and the report's numbers
against hand computation."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from aflora_cli.cli import app
from aflora_cli.commands.sweep.plan import Progress, Run, append_record, grown_grid
from aflora_cli.commands.sweep.pool import shell_command
from aflora_cli.commands.sweep.report import front_table, report_markdown, summarize
from aflora_cli.commands.sweep.spec import load_sweep
from aflora_cli.commands.sweep.stats import T_975, paired
from runs import tiny_bert_dir
from sweep_runs import base_recipe, spec, write_spec

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _sweep(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "aflora_cli", "sweep", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
    )


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def _trainers_of(folder: Path) -> list[int]:
    """Pids of live `aflora train` processes writing under `folder`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = (proc / "stat").read_text().split()[2]
            except OSError:
                continue
            if " train " in command and str(folder) in command and state != "Z":
                pids.append(int(proc.name))
    return pids


def test_a_sweep_runs_is_killed_resumes_and_reports(tmp_path: Path) -> None:
    model = tiny_bert_dir(tmp_path / "model")
    out = tmp_path / "sweep"
    raw = spec(out, lr={"ladder": [1e-2]})  # one rate: how a grid grows is the next test's (and a unit test's)
    path = write_spec(tmp_path, raw, base_recipe(model, steps=16, save_every=4))

    first = _sweep(str(path), "--jobs", "2")  # killed as soon as a run has a checkpoint it has not finished
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        unfinished = [
            m for m in out.glob("runs/*/*/last/adapter_config.json") if json.loads(m.read_text())["step"] < 16
        ]
        if unfinished:
            break
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    deadline = time.monotonic() + 30  # its runs end with it
    while _trainers_of(out) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _trainers_of(out) == []
    interrupted = [  # "aflora_r2 lr 0.01 seed 0" from runs/aflora_r2/lr0.01-seed0
        f"{m.parents[2].name} lr 0.01 seed {m.parents[1].name.rsplit('seed', 1)[1]}"
        for m in out.glob("runs/*/*/last/adapter_config.json")
        if json.loads(m.read_text())["step"] < 16
    ]

    assert interrupted  # killed at a run's first checkpoint (step 4 of 16)

    second = _sweep(str(path), "--jobs", "2")
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, output
    for run in interrupted:  # continued from its checkpoint with --resume, not started again
        assert f"start {run} (resumed)" in output
    records = _records(out)
    keys = [(r["setting"], r["lr"], r["seed"]) for r in records]
    assert sorted(keys) == [(s, 1e-2, seed) for s in ("aflora_r2", "lora_r1") for seed in (0, 1)]  # each once
    assert all(r["steps"] == 16 for r in records)
    assert all(r["trainable_end"] <= r["trainable_average"] <= r["trainable_start"] for r in records)
    assert (out / "front.png").stat().st_size > 1000 and (out / "front.svg").is_file()
    written = (out / "report.md").read_text()
    assert "| lora_r1 |" in written and "baseline" in written
    assert "% of the runs' time" in output

    again = _sweep(str(path), "--report")  # the report alone, from the results: nothing runs
    output, _ = again.communicate(timeout=120)
    assert again.returncode == 0 and "start " not in output
    assert (out / "report.md").read_text() == written
    assert runner.invoke(app, ["sweep", str(path), "--print-commands"]).stdout == ""


def test_printed_commands_run_elsewhere_are_collected(tmp_path: Path) -> None:
    """What a scheduler's jobs write (each command's run folder) is what `--report` reads."""
    model = tiny_bert_dir(tmp_path / "model")
    out = tmp_path / "sweep"
    raw = spec(out, settings={"lora_r1": {"adapter.method": "lora", "adapter.rank": 1}}, seeds=[0], baseline=None)
    raw["lr"] = {"ladder": [1e-3, 1e-2], "start": [1e-2]}
    path = write_spec(tmp_path, raw, base_recipe(model))
    result = runner.invoke(app, ["sweep", str(path), "--print-commands"])
    assert result.exit_code == 0
    commands = result.stdout.splitlines()
    assert len(commands) == 1 and commands[0].startswith("aflora train ")
    assert "--set training.lr=0.01 --set training.head_lr=0.01" in commands[0]
    arguments = commands[0].split()[1:]  # no quoting needed in these paths
    done = subprocess.run([sys.executable, "-m", "aflora_cli", *arguments], env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = runner.invoke(app, ["sweep", str(path), "--print-commands"])  # one rate at the ladder's top: look down
    assert len(result.stdout.splitlines()) == 1 and "--set training.lr=0.001 " in result.stdout
    result = runner.invoke(app, ["sweep", str(path), "--report"])
    assert result.exit_code == 0, result.output
    records = _records(out)
    assert [(r["setting"], r["lr"], r["seed"], r["seconds"]) for r in records] == [("lora_r1", 0.01, 0, None)]


# ---- bad input: one line, exit code 2, before anything trains ---------------------------------------------


def _error(tmp_path: Path, raw_spec: dict, recipe: dict | None = None) -> str:
    path = write_spec(tmp_path, raw_spec, recipe or base_recipe(Path("/nonexistent/model")))
    result = runner.invoke(app, ["sweep", str(path)])
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "sweep" / "runs").exists()
    return result.stderr


def test_an_unknown_key_in_the_grid(tmp_path: Path) -> None:
    raw = spec(tmp_path / "sweep", settings={"a": {"adapter.rnk": 2}, "b": {"adapter.rank": 1}}, baseline="b")
    assert "sweep.yaml: settings.a at lr 0.001: adapter.rnk: unknown key" in _error(tmp_path, raw)


def test_a_grid_point_the_recipe_rejects(tmp_path: Path) -> None:
    raw = spec(tmp_path / "sweep", settings={"a": {"adapter.rank": 2}, "b": {"adapter.method": "dora"}}, baseline="a")
    assert "settings.b at lr 0.001: adapter.method:" in _error(tmp_path, raw)


def test_a_setting_may_not_set_what_the_ladder_sets(tmp_path: Path) -> None:
    raw = spec(tmp_path / "sweep", settings={"a": {"training.lr": 0.1}}, baseline=None)
    assert "settings.a.training.lr: not settable here: the lr ladder sets it" in _error(tmp_path, raw)


def test_a_baseline_not_in_the_grid(tmp_path: Path) -> None:
    assert "baseline: 'lora_r8' is not a setting; one of aflora_r2, lora_r1" in _error(
        tmp_path, spec(tmp_path / "sweep", baseline="lora_r8")
    )


def test_an_unknown_spec_key_and_a_bad_ladder(tmp_path: Path) -> None:
    assert "sweep.yaml: seed: unknown key" in _error(tmp_path, {**spec(tmp_path / "sweep"), "seed": 3})
    raw = spec(tmp_path / "sweep", lr={"ladder": [1e-2, 1e-3]})
    assert "lr.ladder: expected positive rates in ascending order" in _error(tmp_path, raw)


def test_a_results_file_of_another_spec(tmp_path: Path) -> None:
    path = write_spec(tmp_path, spec(tmp_path / "sweep"), base_recipe(Path("/nonexistent/model")))
    other = write_spec(tmp_path / "other", spec(tmp_path / "sweep"), base_recipe(Path("/nonexistent/other")))
    record = _record(load_sweep(other), "lora_r1", 0.01, 0, 0.5, 0.5)
    append_record(load_sweep(other), record)
    result = runner.invoke(app, ["sweep", str(path)])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "results.jsonl: written by another sweep spec" in result.stderr
    assert not (tmp_path / "sweep" / "runs").exists()


# ---- planning and statistics, against hand computation ------------------------------------------------------


def _record(sweep, setting: str, lr: float, seed: int, validation: float, test: float, average: float = 100.0):
    return {
        "spec_hash": sweep.hash,
        "setting": setting,
        "keys": sweep.spec.settings[setting],
        "lr": lr,
        "seed": seed,
        "metrics": {"validation": {"accuracy": validation}, "test": {"accuracy": test}},
        "trainable_average": average,
        "trainable_end": average / 2,
        "trainable_start": average * 2,
        "steps": 4,
        "seconds": 1.0,
    }


def test_the_grid_grows_past_an_edge_until_the_best_is_inside() -> None:
    ladder = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
    scores = {1e-4: 0.1, 3e-4: 0.2, 1e-3: 0.3, 3e-3: 0.4, 1e-2: 0.5, 3e-2: 0.45}
    assert grown_grid([1e-3, 3e-3], ladder, scores.get) == [1e-3, 3e-3, 1e-2, 3e-2]
    assert grown_grid([1e-3, 3e-3], ladder, {1e-3: 0.3, 3e-3: 0.4}.get) == [1e-3, 3e-3, 1e-2]  # not run yet
    assert grown_grid([3e-4], ladder, {3e-4: 0.5, 1e-3: 0.4, 1e-4: 0.6}.get) == [1e-4, 3e-4, 1e-3]  # up, down
    falling = {lr: -lr for lr in ladder}
    assert grown_grid([1e-3, 3e-3], ladder, falling.get) == ladder[:4]  # to the ladder's end
    assert grown_grid([1e-3, 3e-3], ladder, falling.get, goal="min") == [1e-3, 3e-3, 1e-2, 3e-2]


def test_the_report_against_hand_computation(tmp_path: Path) -> None:
    path = write_spec(tmp_path, spec(tmp_path / "sweep", seeds=[0, 1, 2]), base_recipe(Path("/m")))
    sweep = load_sweep(path)
    records = [
        _record(sweep, "lora_r1", 1e-3, 0, 0.70, 0.80, 50.0),
        _record(sweep, "lora_r1", 1e-2, 0, 0.75, 0.82, 50.0),  # chosen
        _record(sweep, "lora_r1", 1e-2, 1, 0.75, 0.78, 50.0),
        _record(sweep, "lora_r1", 1e-2, 2, 0.75, 0.84, 50.0),
        _record(sweep, "aflora_r2", 1e-3, 0, 0.71, 0.83, 30.0),  # chosen: the smaller rate on a tie
        _record(sweep, "aflora_r2", 1e-2, 0, 0.71, 0.99, 30.0),
        _record(sweep, "aflora_r2", 1e-3, 1, 0.70, 0.80, 36.0),
        _record(sweep, "aflora_r2", 1e-3, 2, 0.70, 0.86, 30.0),
    ]
    progress = Progress(sweep, records)
    assert progress.plan() == []
    assert progress.chosen("aflora_r2").lr == 1e-3 and progress.chosen("lora_r1").lr == 1e-2
    rows = {row[0]: row for row in front_table(sweep, summarize(sweep, progress))[1]}
    # aflora - lora by seed: 0.83-0.82, 0.80-0.78, 0.86-0.84 = 0.01, 0.02, 0.02
    mean = (0.01 + 0.02 + 0.02) / 3
    std = math.sqrt(((0.01 - mean) ** 2 + 2 * (0.02 - mean) ** 2) / 2)
    half = 4.303 * std / math.sqrt(3)
    assert T_975[2] == 4.303
    test = paired([0.01, 0.02, 0.02])
    assert test.mean == pytest.approx(mean) and test.half_width == pytest.approx(half)
    assert mean - half > 0 and test.verdict == "holds"  # 0.0167 - 0.0143: the interval lies above zero
    assert rows["aflora_r2"][5] == "32" and rows["aflora_r2"][6] == "16"  # mean of 30, 36, 30; of 15, 18, 15
    assert rows["aflora_r2"][3] == f"{(0.83 + 0.80 + 0.86) / 3:.4f} ± {0.03:.4f}"
    assert rows["aflora_r2"][7] == f"{mean:+.4f} ± {half:.4f}" and rows["aflora_r2"][8] == "holds"
    assert rows["lora_r1"][7] == "baseline"
    assert paired([0.03, -0.02, 0.025]).verdict == "within noise"
    assert paired([-0.03, -0.02, -0.025]).verdict == "does not hold" and paired([0.01]).verdict == "too few seeds"
    assert "| aflora_r2 | 0.7100 | 0.7100 | 0.001 |" in report_markdown(sweep, summarize(sweep, progress))


def test_commands_read_back_to_the_same_recipe(tmp_path: Path) -> None:
    raw = spec(tmp_path / "sweep")
    raw["settings"]["lora_r1"]["adapter.policy"] = {"ffn": "trainable"}
    raw["set"] = {"freezing.t_i": "20%"}
    sweep = load_sweep(write_spec(tmp_path, raw, base_recipe(Path("/m"))))
    command = shell_command(sweep, Run("lora_r1", 1e-3, 1))
    assert "--set 'adapter.policy={ffn: trainable}'" in command and "--set freezing.t_i=20%" in command
    from aflora_cli.recipe import apply_override, parse_recipe

    base = yaml.safe_load((tmp_path / "base.yaml").read_text())
    import shlex

    words = shlex.split(command)
    for i, word in enumerate(words):
        if word == "--set":
            apply_override(base, words[i + 1])
    recipe = parse_recipe(base, "read back")
    assert recipe.adapter.policy == {"ffn": "trainable"} and recipe.seed == 1 and recipe.training.head_lr == 1e-3
    assert recipe.output_dir == str(tmp_path / "sweep" / "runs" / "lora_r1" / "lr0.001-seed1")


def test_a_metric_or_split_the_runs_do_not_have_is_one_line(tmp_path: Path) -> None:
    from aflora_cli.errors import AfloraError

    sweep = load_sweep(write_spec(tmp_path, spec(tmp_path / "sweep", reported_split="dev"), base_recipe(Path("/m"))))
    progress = Progress(sweep, [_record(sweep, "lora_r1", 1e-2, 0, 0.7, 0.8)])
    with pytest.raises(
        AfloraError, match=r"reported_split: run lora_r1 lr 0.01 seed 0 has no 'accuracy' on split 'dev'"
    ):
        summarize(sweep, progress)
    raw = spec(tmp_path / "sweep", selection={"split": "validation", "metric": "f1"})
    sweep = load_sweep(write_spec(tmp_path, raw, base_recipe(Path("/m"))))
    with pytest.raises(AfloraError, match=r"selection: run lora_r1 lr 0.01 seed 0 has no 'f1' on split 'validation'"):
        Progress(sweep, [_record(sweep, "lora_r1", 1e-2, 0, 0.7, 0.8)]).plan()
