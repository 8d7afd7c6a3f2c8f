"""Weights & Biases, MLflow and trackio behind the `Tracker` seam of `tracking.py`.

Each gets the values of `metrics.jsonl` under the TensorBoard tags (`train/loss`, `eval/<metric>`, ...) with
the optimizer step as its step, the resolved recipe as its run's config, and the freeze events as a table
(W&B, trackio) or a JSON artifact (MLflow). Where each run goes is the tracker's own business (`WANDB_MODE`,
`MLFLOW_TRACKING_URI`, `TRACKIO_DIR`, logins), as with the Hugging Face Trainer's `report_to`.

`--resume` continues the same run: W&B rewinds it to the checkpoint's step (`resume_from`), so what a crashed
run logged after its checkpoint is dropped, as metrics.jsonl drops it; MLflow and trackio cannot delete logged
points, so there the re-logged steps follow the dropped ones and the later value at a step is the one
metrics.jsonl holds.
"""

from __future__ import annotations

import os
import time
from typing import Any

from aflora_cli.training.tracking import FreezeEvents, Tracker, freeze_table

MLFLOW_PARAMS_PER_CALL = 100  # log_batch's limit


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as `section.key -> value` strings (MLflow parameters are flat strings)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


class WandbTracker(Tracker):
    """A W&B run: files under `<output_dir>/wandb/` unless `WANDB_DIR` says otherwise."""

    name = "wandb"

    def open(self) -> None:
        import wandb

        run = self.run
        saved = run.saved(self.name).get("run_id")
        kwargs: dict[str, Any] = {
            "project": run.project,
            "name": run.name,
            "config": run.config,
            "allow_val_change": True,
            "reinit": "create_new",
            "settings": wandb.Settings(console="off"),
        }
        if not os.environ.get("WANDB_DIR"):
            run.output_dir.mkdir(parents=True, exist_ok=True)
            kwargs["dir"] = str(run.output_dir)
        if saved:  # rewind the run to the checkpoint: what was logged after it is dropped, as in metrics.jsonl
            kwargs["resume_from"] = f"{saved}?_step={run.resume_step}"
        self.wandb_run = wandb.init(**kwargs)
        run.save(self.name, {"run_id": self.wandb_run.id, "project": run.project})

    def write(self, values: dict[str, float], step: int, flush: bool) -> None:
        self.wandb_run.log(values, step=step)

    def write_freeze_events(self, events: FreezeEvents, step: int) -> None:
        import wandb

        rows = [[when, len(names), " ".join(names)] for when, names in events]
        table = wandb.Table(columns=["step", "pms_frozen", "pms"], data=rows)
        self.wandb_run.log({"aflora/freeze_log": table}, step=step)

    def finish(self) -> None:
        self.wandb_run.finish()


class MlflowTracker(Tracker):
    """An MLflow run in experiment `logging.project`, on the tracking server or store MLflow is set up for."""

    name = "mlflow"

    def open(self) -> None:
        import mlflow
        from mlflow import MlflowClient
        from mlflow.entities import Param

        run = self.run
        self.client = MlflowClient()
        saved = run.saved(self.name).get("run_id")
        if saved:
            self.client.get_run(saved)  # a run the store does not hold fails here, in one line
            self.run_id = saved
            self.client.update_run(saved, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name(run.project)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(run.project)
            self.run_id = self.client.create_run(experiment_id, run_name=run.name).info.run_id
            params = [Param(key, value[:6000]) for key, value in flatten(run.config).items()]
            for start in range(0, len(params), MLFLOW_PARAMS_PER_CALL):
                self.client.log_batch(self.run_id, params=params[start : start + MLFLOW_PARAMS_PER_CALL])
            self.client.log_dict(self.run_id, run.config, "aflora/recipe.json")
        run.save(self.name, {"run_id": self.run_id, "tracking_uri": mlflow.get_tracking_uri()})

    def write(self, values: dict[str, float], step: int, flush: bool) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag, float(value), now, step) for tag, value in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def write_freeze_events(self, events: FreezeEvents, step: int) -> None:
        log = [{"step": when, "pms": names} for when, names in events]
        self.client.log_dict(self.run_id, {"freeze_log": log}, "aflora/freeze_log.json")
        self.client.log_text(self.run_id, freeze_table(events) + "\n", "aflora/freeze_log.md")

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)


class TrackioTracker(Tracker):
    """A trackio run in project `logging.project`, stored locally (`TRACKIO_DIR`) or where trackio is pointed."""

    name = "trackio"

    def open(self) -> None:
        import trackio

        run = self.run
        saved = run.saved(self.name).get("run")
        self.trackio_run = trackio.init(
            project=run.project,
            name=saved or run.name,
            config=run.config,
            resume="allow" if saved else "never",
            embed=False,
            auto_log_cpu=False,
            auto_log_gpu=False,
        )
        run.save(self.name, {"run": self.trackio_run.name, "project": run.project})

    def write(self, values: dict[str, float], step: int, flush: bool) -> None:
        self.trackio_run.log(values, step=step)

    def write_freeze_events(self, events: FreezeEvents, step: int) -> None:
        import trackio

        rows = [[when, len(names), " ".join(names)] for when, names in events]
        table = trackio.Table(columns=["step", "pms_frozen", "pms"], data=rows)
        self.trackio_run.log({"aflora/freeze_log": table}, step=step)

    def finish(self) -> None:
        self.trackio_run.finish()
