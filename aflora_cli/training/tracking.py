"""Experiment trackers: the trainer hands every `metrics.jsonl` record to `RunTrackers.log`, which turns it into
the same named values on the same step axis for each tracker the recipe asks for (`logging.report_to`).

The seam is `Tracker`: a tracker is opened at its first value (so a dry run opens none), gets the resolved
recipe as its run's config, every record's values as `tag -> value` at the record's optimizer step, the freeze
events (step -> PMs frozen) when the run closes, and `finish()`. TensorBoard lives here; Weights & Biases,
MLflow and trackio in `trackers.py`. Only rank 0 builds trackers. A tracker that can continue a run on
`--resume` keeps its run id in `<output_dir>/trackers.json`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from aflora_cli.errors import AfloraError

TENSORBOARD_DIR = "tensorboard"
INSTALL_HINT = "pip install 'aflora[tensorboard]'"
RUN_IDS_FILE = "trackers.json"

# step-record key -> tag; the first four are the Hugging Face Trainer's names, so dashboards line up
TRAIN_TAGS = {
    "loss": "train/loss",
    "lr": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "epoch": "train/epoch",
    "trainable": "train/trainable_params",
    "frozen_pms": "train/frozen_pms",
}

# tracker -> (the module it needs, the extra that installs it)
REQUIREMENTS = {
    "tensorboard": ("torch.utils.tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}

FreezeEvents = list[tuple[int, list[str]]]  # (step, the PMs frozen at that step), by step


def summary_writer_class() -> type[Any]:
    """torch's SummaryWriter, imported only when asked for, since tensorboard is an optional extra."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise AfloraError(
            f"logging.tensorboard: the tensorboard package is not installed; run {INSTALL_HINT}"
        ) from None
    return SummaryWriter


def require(names: list[str], from_tensorboard_key: bool = False) -> None:
    """Check every tracker's package now, before anything loads: a missing one is one line naming its extra.
    (Found without importing it — W&B and MLflow take seconds to import; they are imported when their run opens.)"""
    for name in names:
        module, extra = REQUIREMENTS[name]
        if name == "tensorboard":  # torch's module is always there; importing it needs the package
            try:
                summary_writer_class()
            except AfloraError:
                if from_tensorboard_key:
                    raise  # its message names the recipe key that asked for it
                found = False
            else:
                continue
        else:
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):  # a parent package missing, or a module set to None in sys.modules
                found = False
        if not found:
            raise AfloraError(
                f"logging.report_to: {name} needs the {extra} package, which is not installed; "
                f"run pip install 'aflora[{extra}]'"
            )


def eval_prefix(split: str, first: bool) -> str:
    """`eval` for the first eval split, `eval_<split>` for the others.

    The first split is the one that picks the best checkpoint, and a single eval set is logged as `eval/...`
    by the Hugging Face Trainer too; further splits get a section of their own so their curves never mix.
    """
    return "eval" if first else f"eval_{split}"


def scalars_of(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as `tag -> value`: a step record's TRAIN_TAGS, an evaluation's numeric metrics
    per split; events (skipped rows, non-finite steps) are no values."""
    if "event" in record:
        return {}
    values: dict[str, float] = {}
    if "eval" in record:
        for i, (split, metrics) in enumerate(record["eval"].items()):
            prefix = eval_prefix(split, first=i == 0)
            for metric, value in metrics.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    values[f"{prefix}/{metric}"] = value
        return values
    return {tag: record[key] for key, tag in TRAIN_TAGS.items() if key in record}


def freeze_events(freeze_log: dict[str, int | None]) -> FreezeEvents:
    """The freezer's log (PM -> step it froze, or None) as (step, PMs) events in step order."""
    by_step: dict[int, list[str]] = {}
    for name, step in freeze_log.items():
        if step is not None:
            by_step.setdefault(step, []).append(name)
    return [(step, sorted(names)) for step, names in sorted(by_step.items())]


def freeze_table(events: FreezeEvents) -> str:
    """The freeze events as a small Markdown table (for trackers that show text)."""
    lines = ["| step | PMs frozen | PMs |", "|---:|---:|---|"]
    lines += [f"| {step} | {len(names)} | {', '.join(names)} |" for step, names in events]
    return "\n".join(lines)


@dataclass
class RunInfo:
    """What every tracker knows about the run it records."""

    output_dir: Path
    project: str
    name: str
    config: dict[str, Any]  # the resolved recipe
    resume_step: int  # the step a resumed run continues after; 0 for a fresh run

    def saved(self, tracker: str) -> dict[str, Any]:
        """What `tracker` saved about its run when this run was started (its run id), or {} when nothing."""
        file = self.output_dir / RUN_IDS_FILE
        if not self.resume_step or not file.is_file():
            return {}
        try:
            found = json.loads(file.read_text(encoding="utf-8")).get(tracker)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return {}
        return found if isinstance(found, dict) else {}

    def save(self, tracker: str, ids: dict[str, Any]) -> None:
        """Keep `tracker`'s run id beside metrics.jsonl, so `--resume` continues the same run."""
        file = self.output_dir / RUN_IDS_FILE
        try:
            known = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            known = {}
        known = known if isinstance(known, dict) else {}
        known[tracker] = ids
        self.output_dir.mkdir(parents=True, exist_ok=True)
        partial = file.with_name(f".{RUN_IDS_FILE}.tmp")
        partial.write_text(json.dumps(known, indent=2) + "\n", encoding="utf-8")
        partial.replace(file)


class Tracker(ABC):
    """One experiment tracker of a run. Subclasses open their run in `open()`, called before the first value."""

    name: ClassVar[str]

    def __init__(self, run: RunInfo) -> None:
        self.run = run
        self.opened = False

    def _ensure_open(self) -> None:
        if not self.opened:
            try:
                self.open()
            except AfloraError:
                raise
            except Exception as err:  # a tracker's own failure (no login, no server): one line, not a traceback
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise AfloraError(f"logging.report_to: {self.name} could not start its run ({first})") from None
            self.opened = True

    def log(self, values: dict[str, float], step: int, flush: bool) -> None:
        self._ensure_open()
        self.write(values, step, flush)

    @abstractmethod
    def open(self) -> None:
        """Start (or, on resume, continue) the run and record the config."""

    @abstractmethod
    def write(self, values: dict[str, float], step: int, flush: bool) -> None:
        """Record `tag -> value` at optimizer step `step`; `flush`: an evaluation, worth seeing at once."""

    @abstractmethod
    def write_freeze_events(self, events: FreezeEvents, step: int) -> None:
        """Record the freeze events as the tracker allows (a table or text), at the run's last step."""

    @abstractmethod
    def finish(self) -> None:
        """Flush and end the run."""


class TensorBoardTracker(Tracker):
    """Scalars for one run under `<output_dir>/tensorboard/`, with each record's `step` as global step."""

    name = "tensorboard"

    def __init__(self, run: RunInfo) -> None:
        super().__init__(run)
        self.writer_class = summary_writer_class()
        self.log_dir = run.output_dir / TENSORBOARD_DIR
        # on resume, hide what a crashed run logged after its checkpoint, as metrics.jsonl drops those lines
        self.purge_step = run.resume_step + 1 if run.resume_step else None
        self.writer: Any = None

    def open(self) -> None:
        self.writer = self.writer_class(log_dir=str(self.log_dir), purge_step=self.purge_step)
        if not self.run.resume_step:
            recipe = json.dumps(self.run.config, indent=2)
            self.writer.add_text("aflora/recipe", "    " + recipe.replace("\n", "\n    "), 0)

    def write(self, values: dict[str, float], step: int, flush: bool) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        if flush:
            self.writer.flush()

    def write_freeze_events(self, events: FreezeEvents, step: int) -> None:
        self.writer.add_text("aflora/freeze_log", freeze_table(events), step)

    def finish(self) -> None:
        self.writer.close()


class RunTrackers:
    """Every tracker of a run behind one call per record; the trainer knows nothing of the trackers."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers
        self.closed = False

    def log(self, record: dict[str, Any]) -> None:
        """Write one metrics.jsonl record to every tracker."""
        values = scalars_of(record)
        if self.closed or not values:
            return
        for tracker in self.trackers:
            tracker.log(values, record["step"], flush="eval" in record)

    def close(self, freeze_log: dict[str, int | None] | None = None, step: int = 0) -> None:
        """Record the freeze events and end every run that was opened; safe to call twice (end of training,
        then Trainer.close on the way out)."""
        if self.closed:
            return
        self.closed = True
        events = freeze_events(freeze_log or {})
        for tracker in self.trackers:
            if tracker.opened:
                if events:
                    tracker.write_freeze_events(events, step)
                tracker.finish()


def open_trackers(names: list[str], run: RunInfo) -> RunTrackers:
    """The trackers `names` (their packages already checked by `require`) for one run."""
    from aflora_cli.training import trackers

    kinds: dict[str, type[Tracker]] = {
        "tensorboard": TensorBoardTracker,
        "wandb": trackers.WandbTracker,
        "mlflow": trackers.MlflowTracker,
        "trackio": trackers.TrackioTracker,
    }
    return RunTrackers([kinds[name](run) for name in names])


def run_name(configured: str | None, output_dir: Path) -> str:
    """The run's name in the trackers: the recipe's, else the output folder's own name."""
    return configured or Path(os.path.abspath(output_dir)).name
