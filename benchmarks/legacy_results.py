"""The raw results of the retired benchmark scripts (at_scale.py, front.py, front_lm.py, replicate.py; their code
is in commit 1461bbd) as `aflora sweep` records of the specs in benchmarks/sweeps/, so that the sweep's own report
and picture read the committed files unchanged:

    python benchmarks/legacy_results.py benchmarks/sweeps/front-movie-reviews.yaml   # writes its results.jsonl
    aflora sweep benchmarks/sweeps/front-movie-reviews.yaml --report                 # tables and front.png
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aflora_cli.commands.sweep.spec import Sweep, load_sweep
from common import read_jsonl

RAW = Path(__file__).resolve().parent / "results"
# spec file -> (the raw files of its runs, in order: a later file's run replaces an earlier one's; the task they ran)
SOURCES = {
    "at-scale-movie-reviews.yaml": (("at_scale.jsonl",), "movie_reviews"),
    "at-scale-movie-reviews-rating.yaml": (("at_scale.jsonl",), "movie_reviews_rating"),
    "at-scale-rating-ablations.yaml": (("at_scale.jsonl",), "movie_reviews_rating"),
    "front-movie-reviews.yaml": (("at_scale.jsonl", "front.jsonl"), "movie_reviews"),
    "front-lm-bbc-headlines.yaml": (("front_lm.jsonl",), "bbc_headlines"),
    "replicate-movie-reviews.yaml": (("replicate.jsonl",), "movie_reviews"),
    "replicate-movie-reviews-rating.yaml": (("replicate.jsonl",), "movie_reviews_rating"),
}
KEPT = ("seed", "metrics", "trainable_average", "trainable_end", "trainable_start", "steps")  # as they were


def sweep_records(sweep: Sweep, files: list[Path], keep: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """Each kept record of a setting the spec names, at head rate = adapter rate, in the sweep's fields; a later
    file's run replaces an earlier one's of the same key (front.py's rule: its grids grew at_scale.py's)."""
    records = []
    for path in files:
        for old in read_jsonl(path):
            keys = sweep.spec.settings.get(old["method"])
            if keys is None or not keep(old) or ("head_lr" in old and old["head_lr"] != old["lr"]):
                continue
            lr = old["lr"] if sweep.spec.lr else None  # a spec without a ladder: the setting's rate
            record = {"spec_hash": sweep.hash, "setting": old["method"], "keys": keys, "lr": lr}
            record |= {key: old[key] for key in KEPT} | {"seconds": old.get("wall_s", old.get("train_time_s"))}
            records.append(record)
    return records


def spec_records(sweep: Sweep) -> list[dict[str, Any]]:
    """The committed runs of a spec in SOURCES."""
    files, task = SOURCES[sweep.path.name]
    return sweep_records(sweep, [RAW / name for name in files], lambda r: r["task"] == task)


def main(spec: str) -> None:
    sweep = load_sweep(spec)
    records = spec_records(sweep)
    sweep.results_file.parent.mkdir(parents=True, exist_ok=True)
    sweep.results_file.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    print(f"wrote {len(records)} runs to {sweep.results_file}")


if __name__ == "__main__":
    main(sys.argv[1])
