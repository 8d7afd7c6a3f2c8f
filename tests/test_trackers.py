"""Weights & Biases, MLflow and trackio, offline for real: a short MiniLM run reports to all three at once, and
each tracker's own files are read back (W&B's offline run file, MLflow's file store through its client,
trackio's local database) and compared with metrics.jsonl: the same values at the same steps, the recipe as the
run's config, the freeze log; `--resume` continues the same run."""

from __future__ import annotations

import json
import os
import struct
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aflora_cli.errors import AfloraError
from aflora_cli.recipe import load_recipe
from aflora_cli.training.trainer import Trainer
from runs import quick_recipe, recipe_of, run, write_recipe

# trackio reads its folder when first imported: point it at a private one before anything imports it
os.environ.setdefault("TRACKIO_DIR", tempfile.mkdtemp(prefix="aflora-trackio-"))

TAGS = {
    "loss": "train/loss",
    "lr": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "epoch": "train/epoch",
    "trainable": "train/trainable_params",
    "frozen_pms": "train/frozen_pms",
}
TRACKERS = ["wandb", "mlflow", "trackio"]


class Crash(Exception):
    pass


def _expected(output_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} as metrics.jsonl holds them."""
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "event" not in r]
    evals = [r for r in records if "eval" in r]
    assert steps and evals and list(evals[0]["eval"]) == ["validation", "test"]
    expected = {tag: {r["step"]: r[key] for r in steps} for key, tag in TAGS.items()}
    expected["eval/accuracy"] = {r["step"]: r["eval"]["validation"]["accuracy"] for r in evals}
    expected["eval_test/accuracy"] = {r["step"]: r["eval"]["test"]["accuracy"] for r in evals}
    return expected


def _assert_equal(got: dict[str, dict[int, float]], expected: dict[str, dict[int, float]]) -> None:
    for tag, series in expected.items():
        assert sorted(got[tag]) == sorted(series), tag
        assert [got[tag][s] for s in sorted(series)] == pytest.approx([series[s] for s in sorted(series)], rel=1e-6)


def _freeze_rows(output_dir: Path) -> list[list[Any]]:
    """(step, PMs frozen, PMs) per freezing step, from the checkpoint's own freeze log."""
    log = json.loads((output_dir / "last" / "adapter_config.json").read_text())["freeze_log"]
    steps = sorted({step for step in log.values() if step is not None})
    rows = []
    for step in steps:
        names = sorted(name for name, at in log.items() if at == step)
        rows.append([step, len(names), " ".join(names)])
    return rows


@pytest.fixture(scope="module")
def tracker_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("trackers")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        patch.delenv("WANDB_DIR", raising=False)
        patch.setenv("MLFLOW_TRACKING_URI", (folder / "mlruns").as_uri())
        patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        yield folder
    import wandb

    wandb.teardown()


@pytest.fixture(scope="module")
def straight_run(tracker_env: Path) -> Path:
    out = tracker_env / "straight"
    logging = {"report_to": TRACKERS, "project": "aflora-straight"}
    run(quick_recipe(out, training={"max_steps": 6, "eval_every": 3}, logging=logging))
    return out


@pytest.fixture(scope="module")
def resumed_run(tracker_env: Path) -> Path:
    """Crashed at step 5 after a checkpoint at step 3 (steps 4 and 5 logged), then resumed to step 8."""

    def crash_at_step_5(kind: str, record: dict) -> None:
        if kind == "step" and record["step"] == 5:
            raise Crash

    out = tracker_env / "resumed"
    logging = {"report_to": TRACKERS, "project": "aflora-resumed", "run_name": "crash-and-resume"}
    raw = quick_recipe(out, training={"max_steps": 8, "save_every": 3, "eval_every": 4}, logging=logging)
    trainer = Trainer(recipe_of(raw), on_event=crash_at_step_5)
    trainer.prepare()
    with pytest.raises(Crash):
        trainer.train()
    trainer.close()  # as the CLI does on the way out
    run(raw, resume=True)
    return out


# ---------------------------------------------------------------------------------------------- W&B


def _wandb_records(file: Path) -> Iterator[Any]:
    """The protobuf records of a W&B transaction log (`run-<id>.wandb`): a 7-byte header (":W&B", magic,
    version), then LevelDB-log framing in 32 KiB blocks — per chunk CRC (4 bytes), length (2), type (1: whole
    record, 2/3/4: first/middle/last piece)."""
    from wandb.proto import wandb_internal_pb2

    data = file.read_bytes()
    assert data[:4] == b":W&B"
    block, position, pieces = 32768, 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        position += 7
        if kind == 0:
            continue
        pieces += data[position : position + length]
        position += length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def _wandb_run(output_dir: Path) -> dict[str, Any]:
    """History (tag -> {step: value}), config, branch point and run ids of every run file, oldest first; a
    resumed file's history replaces what the earlier ones logged after its branch point, as W&B does on sync."""
    files = sorted((output_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files
    history: dict[str, dict[int, Any]] = {}
    found: dict[str, Any] = {"ids": [], "branch_points": [], "config": {}}
    for file in files:
        for record in _wandb_records(file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                found["ids"].append(record.run.run_id)
                if record.run.HasField("branch_point"):
                    point = int(record.run.branch_point.value)
                    found["branch_points"].append(point)
                    for series in history.values():
                        for step in [s for s in series if s > point]:
                            del series[step]
                for update in record.run.config.update:
                    found["config"][update.key] = json.loads(update.value_json)
            elif kind == "history":
                step = record.history.step.num
                for item in record.history.item:
                    key = "/".join(item.nested_key) if item.nested_key else item.key
                    history.setdefault(key, {})[step] = json.loads(item.value_json)
    found["history"] = history
    return found


def test_wandb_offline_run_holds_metrics_jsonl_the_recipe_and_the_freeze_log(straight_run: Path) -> None:
    found = _wandb_run(straight_run)
    _assert_equal(found["history"], _expected(straight_run))
    assert found["config"]["adapter"]["rank"] == 4  # the resolved recipe is the run's config
    assert found["config"]["training"]["max_steps"] == 6
    ids = json.loads((straight_run / "trackers.json").read_text())
    assert ids["wandb"]["run_id"] == found["ids"][0]
    paths = found["history"]["aflora/freeze_log/path"]
    (step, path), *_ = paths.items()
    assert step == 6  # logged at the end of the run
    (folder,) = {file.parent for file in (straight_run / "wandb").glob("offline-run-*/run-*.wandb")}
    table = json.loads((folder / "files" / path).read_text())
    assert table["columns"] == ["step", "pms_frozen", "pms"]
    assert table["data"] == _freeze_rows(straight_run) and table["data"]


def test_wandb_resume_rewinds_the_same_run_to_the_checkpoint(resumed_run: Path) -> None:
    found = _wandb_run(resumed_run)
    assert len(set(found["ids"])) == 1 and len(found["ids"]) == 2  # one run, continued
    assert found["branch_points"] == [3]  # rewound to the checkpoint: steps 4 and 5 of the crash are dropped
    _assert_equal(found["history"], _expected(resumed_run))
    assert sorted(found["history"]["train/loss"]) == list(range(1, 9))


# ---------------------------------------------------------------------------------------------- MLflow


def _mlflow_run(output_dir: Path) -> tuple[Any, str, dict[str, dict[int, float]]]:
    """(client, run id, tag -> {step: value}); where a step was logged twice, the later value."""
    from mlflow import MlflowClient

    run_id = json.loads((output_dir / "trackers.json").read_text())["mlflow"]["run_id"]
    client = MlflowClient()
    logged = client.get_run(run_id).data.metrics
    series: dict[str, dict[int, float]] = {}
    for tag in logged:
        history = sorted(client.get_metric_history(run_id, tag), key=lambda m: m.timestamp)
        series[tag] = {m.step: m.value for m in history}
    return client, run_id, series


def test_mlflow_file_store_holds_metrics_jsonl_the_recipe_and_the_freeze_log(straight_run: Path, tmp_path) -> None:
    client, run_id, series = _mlflow_run(straight_run)
    _assert_equal(series, _expected(straight_run))
    found = client.get_run(run_id)
    assert found.info.status == "FINISHED" and found.info.run_name == "straight"
    assert found.data.params["adapter.rank"] == "4" and found.data.params["training.max_steps"] == "6"
    assert client.get_experiment(found.info.experiment_id).name == "aflora-straight"
    local = Path(client.download_artifacts(run_id, "aflora", str(tmp_path)))
    assert json.loads((local / "recipe.json").read_text())["training"]["max_steps"] == 6
    log = json.loads((local / "freeze_log.json").read_text())["freeze_log"]
    assert [[e["step"], len(e["pms"]), " ".join(e["pms"])] for e in log] == _freeze_rows(straight_run)


def test_mlflow_resume_continues_the_same_run(resumed_run: Path) -> None:
    client, run_id, series = _mlflow_run(resumed_run)
    _assert_equal(series, _expected(resumed_run))  # the later value at a re-logged step is metrics.jsonl's
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    assert client.get_run(run_id).info.status == "FINISHED"


# ---------------------------------------------------------------------------------------------- trackio


def _trackio_run(project: str, name: str) -> tuple[list[dict[str, Any]], dict[str, dict[int, float]]]:
    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs(project, name)
    series: dict[str, dict[int, float]] = {}
    for row in logs:  # in the order logged: a re-logged step keeps its later value
        for key, value in row.items():
            if isinstance(value, int | float) and key != "step":
                series.setdefault(key, {})[row["step"]] = value
    return logs, series


def test_trackio_local_run_holds_metrics_jsonl_the_recipe_and_the_freeze_log(straight_run: Path) -> None:
    from trackio.sqlite_storage import SQLiteStorage

    logs, series = _trackio_run("aflora-straight", "straight")
    _assert_equal(series, _expected(straight_run))
    config = SQLiteStorage.get_run_config("aflora-straight", "straight")
    assert config["adapter"]["rank"] == 4 and config["training"]["max_steps"] == 6
    (table,) = [row["aflora/freeze_log"] for row in logs if "aflora/freeze_log" in row]
    rows = [[r["step"], r["pms_frozen"], r["pms"]] for r in table["_value"]]
    assert rows == _freeze_rows(straight_run)


def test_trackio_resume_continues_the_same_run(resumed_run: Path) -> None:
    from trackio.sqlite_storage import SQLiteStorage

    assert SQLiteStorage.get_runs("aflora-resumed") == ["crash-and-resume"]
    _, series = _trackio_run("aflora-resumed", "crash-and-resume")
    _assert_equal(series, _expected(resumed_run))


# ---------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize("tracker", [*TRACKERS, "tensorboard"])
def test_missing_tracker_is_one_line_naming_the_extra(tracker: str, tmp_path: Path, monkeypatch) -> None:
    module = "torch.utils.tensorboard" if tracker == "tensorboard" else tracker
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: `import` raises ImportError
    trainer = Trainer(recipe_of(quick_recipe(tmp_path / "run", logging={"report_to": [tracker]})))
    with pytest.raises(AfloraError) as info:
        trainer.prepare()
    message = str(info.value)
    assert "\n" not in message and message.startswith("logging.report_to")
    assert f"pip install 'aflora[{tracker}]'" in message
    assert not (tmp_path / "run").exists()  # nothing loaded, nothing written


def test_report_to_is_read_as_a_name_or_a_list_and_checked(tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", quick_recipe(tmp_path / "run"))
    assert load_recipe(path).logging.trackers() == []
    assert load_recipe(path, ["logging.report_to=wandb"]).logging.report_to == ["wandb"]
    both = load_recipe(path, ["logging.report_to=[tensorboard, mlflow]", "logging.tensorboard=true"])
    assert both.logging.trackers() == ["tensorboard", "mlflow"]
    assert load_recipe(path, ["logging.report_to=none"]).logging.report_to == []
    with pytest.raises(AfloraError, match=r"logging\.report_to\.0: Input should be 'tensorboard'"):
        load_recipe(path, ["logging.report_to=[comet]"])
