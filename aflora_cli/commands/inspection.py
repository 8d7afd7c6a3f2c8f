"""`aflora inspect`: what a checkpoint says about its run, from the checkpoint directory alone.

The report is plain data (it is what `--json` prints): the model and task, the step plan, the metric at
the checkpoint, the trainable-parameter counts over training, every projection matrix (PM) with the step
it froze, and the per-layer freezing heat map of the paper's Fig. 5. Rendering lives in `report.py`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from aflora_cli.adapted.reading import read_checkpoint_manifest
from aflora_cli.engine.manifest import MATRICES, WEIGHTS_FILE
from aflora_cli.errors import AfloraError

_NUMBER = re.compile(r"^\d+$")


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the weights file's header, no tensor data read. The header is read by hand (8 bytes of
    little-endian length, then JSON; the safetensors format's whole header): the safetensors reader would import
    numpy or torch for it, a second of `aflora inspect`'s start-up."""
    file = path / WEIGHTS_FILE
    try:
        with file.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 0 < length <= file.stat().st_size - 8:
                raise ValueError(f"header length {length} does not fit a file of {file.stat().st_size} bytes")
            header = json.loads(handle.read(length))
        return {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise AfloraError(f"{file}: damaged weights file ({err})") from None


# ------------------------------------------------------------------------------------------------- report


def split_module(name: str) -> tuple[int | None, str]:
    """`bert.encoder.layer.3.intermediate.dense` -> (3, "intermediate.dense"): the first numeric path part."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if _NUMBER.match(part):
            return int(part), ".".join(parts[i + 1 :]) or name
    return None, name


def matrix_rows(manifest: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> list[dict[str, Any]]:
    """Every PM of every adapted module, in model order (A before B).

    Adaptive PMs froze when the freeze log says; PMs under policy `frozen` never trained (frozen at step 0);
    PMs under policy `trainable` never freeze.
    """
    per_epoch = max(manifest["freezing"]["steps_per_epoch"], 1)
    scores = manifest["freeze_scores"]
    rows = []
    for target in manifest["targets"]:
        layer, module = split_module(target["name"])
        for matrix in MATRICES:
            name = f"{target['name']}.{matrix}"
            policy = target["policy"]
            step = manifest["freeze_log"].get(name) if policy == "adaptive" else 0 if policy == "frozen" else None
            shape = shapes.get(name)
            rows.append(
                {
                    "name": name,
                    "layer": layer,
                    "module": module,
                    "matrix": matrix[-1],
                    "kind": target["kind"],
                    "policy": policy,
                    "frozen_at_step": step,
                    "frozen_at_epoch": None if step is None else step / per_epoch,
                    "score": scores.get(name) if policy == "adaptive" else None,
                    "params": None if shape is None else _numel(shape),
                }
            )
    return rows


def by_freezing_step(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows sorted by the step their PM froze; never-frozen last; ties keep model order."""
    return sorted(rows, key=lambda row: (row["frozen_at_step"] is None, row["frozen_at_step"] or 0))


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def heatmap(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Fig. 5 from rows in model order: one row per layer, one column per module x A/B of the adaptive PMs.

    A cell holds the step its PM froze (None: never froze); `present` is False where a layer has no such PM.
    """
    adaptive = [row for row in rows if row["policy"] == "adaptive"]
    layers = list(dict.fromkeys(row["layer"] for row in adaptive))
    columns = list(dict.fromkeys(f"{row['module']} {row['matrix']}" for row in adaptive))
    cells = {(row["layer"], f"{row['module']} {row['matrix']}"): row["frozen_at_step"] for row in adaptive}
    return {
        "layers": layers,
        "columns": columns,
        "frozen_at_step": [[cells.get((layer, column)) for column in columns] for layer in layers],
        "present": [[(layer, column) in cells for column in columns] for layer in layers],
    }


def target_groups(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Targets folded over layers: one entry per (module, kind, policy) with the layers it appears in."""
    groups: dict[tuple[str, str, str], list[int | None]] = {}
    for target in manifest["targets"]:
        layer, module = split_module(target["name"])
        groups.setdefault((module, target["kind"], target["policy"]), []).append(layer)
    return [
        {"module": module, "kind": kind, "policy": policy, "layers": layers}
        for (module, kind, policy), layers in groups.items()
    ]


def final_metric(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The task's main metric on its first eval split, as logged at this checkpoint (None if not evaluated)."""
    metrics = manifest.get("metrics")
    if not metrics:
        return None
    split, values = next(iter(metrics.items()))
    name = manifest["task"]["main_metric"]
    if not isinstance(values, dict) or name not in values:
        return None
    return {"split": split, "name": name, "value": values[name]}


def freezing_note(rows: list[dict[str, Any]], freezing: dict[str, Any], step: int) -> str | None:
    """A plain sentence when the checkpoint has adaptive PMs and none of them froze; else None."""
    adaptive = [row for row in rows if row["policy"] == "adaptive"]
    if not adaptive or any(row["frozen_at_step"] is not None for row in adaptive):
        return None
    total, t_i, t_f = freezing["total_steps"], freezing["t_i"], freezing["t_f"]
    layout = f"t_i = {t_i}, T - t_f = {total - t_f} of T = {total}"
    if step < total:
        return f"no adaptive PM has frozen yet at step {step} ({layout})"
    why = "t_i >= T, so the ramp never started" if t_i >= total else "the ramp froze none of them"
    return (
        f"this run froze no adaptive PM ({layout}: {why}); it trained as LoRA with scaling vectors, every "
        "adaptive PM trainable to the end"
    )


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """Everything `aflora inspect` shows, as plain data; reads only the checkpoint directory."""
    path = Path(path)
    manifest = read_checkpoint_manifest(path)
    shapes = weight_shapes(path)
    freezing = manifest["freezing"]
    rows = matrix_rows(manifest, shapes)
    task = manifest["task"]
    return {
        "checkpoint": str(path),
        "base_model": manifest["base_model"],
        "task": {key: task.get(key) for key in ("name", "problem", "num_labels", "label_names", "metrics", "format")}
        | {
            "family": task.get("family", "classification"),
            "main_metric": task["main_metric"],
            "eval_splits": list(task["eval_splits"]),
        },
        "method": manifest["method"],
        "rank": manifest["rank"],
        "scaling": manifest["scaling"],
        "targets": target_groups(manifest),
        "head": manifest["head"],
        "step": manifest["step"],
        "epoch": manifest["step"] / max(freezing["steps_per_epoch"], 1),
        "total_steps": freezing["total_steps"],
        "steps_per_epoch": freezing["steps_per_epoch"],
        "t_i": freezing["t_i"],
        "t_f": freezing["t_f"],
        "freezing": freezing,
        "metrics": manifest.get("metrics"),
        "final_metric": final_metric(manifest),
        "trainable_params": manifest["trainable_params"],
        "matrices": by_freezing_step(rows),
        "freezing_note": freezing_note(rows, freezing, manifest["step"]),
        "heatmap": heatmap(rows),
    }
