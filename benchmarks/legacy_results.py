"""The raw results of the old benchmark scripts (at_scale.jsonl, front.jsonl) as `aflora sweep` records of a spec
in benchmarks/sweeps/, so that the sweep's own report reads the committed files unchanged."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aflora_cli.commands.sweep.spec import Sweep


def sweep_records(sweep: Sweep, files: list[Path], keep: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """Each kept record of a setting the spec names, at head rate = adapter rate, in the sweep's fields; a later
    file's run replaces an earlier one's of the same key (front.py's rule: its grids grew at_scale.py's)."""
    records = []
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            old = json.loads(line)
            keys = sweep.spec.settings.get(old["method"])
            if keys is None or not keep(old) or old.get("head_lr", old["lr"]) != old["lr"]:
                continue
            records.append(
                {
                    "spec_hash": sweep.hash,
                    "setting": old["method"],
                    "keys": keys,
                    "lr": old["lr"],
                    "seed": old["seed"],
                    "metrics": old["metrics"],
                    "trainable_average": old["trainable_average"],
                    "trainable_end": old["trainable_end"],
                    "trainable_start": old["trainable_start"],
                    "steps": old["steps"],
                    "seconds": old.get("wall_s", old.get("train_time_s")),
                }
            )
    return records
