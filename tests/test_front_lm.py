"""benchmarks/front_lm.py and plot_front.py --lm: the settings' recipes, the plan, the report's numbers (worked
out by hand from a small raw file), the plot's points, and a smoke run on a tiny LLaMA end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from aflora_cli.engine.inject import DEFAULT_TARGETS, resolve_policy
from aflora_cli.recipe import parse_recipe

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from front_lm import FULL, LORA, PRIORITY, QUICKSTART, RESULTS_FILE, SCALES, Runs, build_recipe, report  # noqa: E402
from plot_front import draw, lm_front_data  # noqa: E402

TASK = "bbc_headlines"
WORDS = "movie_reviews_words"


def rec(
    method: str, lr: float, seed: int, val: float, test: float, trainable: float, end: int = 0, **extra: Any
) -> dict[str, Any]:
    return {
        "task": TASK,
        "method": method,
        "lr": lr,
        "seed": seed,
        "scale": FULL,
        "metrics": {"validation": {"rougeL": val, "loss": 2.0}, "test": {"rougeL": test, "loss": 2.0}},
        "trainable_average": trainable,
        "trainable_end": end,
        "wall_s": 1500.0,
        "machine": {"torch_threads": 2},
        **extra,
    }


def raw_records() -> list[dict[str, Any]]:
    return [
        # AFLoRA r=4: 1e-2 best on validation; seeds 0-2 there
        rec("aflora_r4", 1e-3, 0, 0.20, 0.20, 390000, 156360),
        rec("aflora_r4", 3e-3, 0, 0.25, 0.25, 390000, 156360),
        rec("aflora_r4", 1e-2, 0, 0.28, 0.30, 384000, 156360),
        rec("aflora_r4", 3e-2, 0, 0.22, 0.22, 390000, 156360),
        rec("aflora_r4", 1e-2, 1, 0.27, 0.32, 385000, 156360),
        rec("aflora_r4", 1e-2, 2, 0.29, 0.31, 383000, 156360),
        # LoRA r=1: 3e-2 (past LR_GRID's edge, so the grid grew to 1e-1, which did worse)
        rec("lora_r1", 1e-3, 0, 0.18, 0.18, 305280, 305280),
        rec("lora_r1", 3e-3, 0, 0.24, 0.24, 305280, 305280),
        rec("lora_r1", 1e-2, 0, 0.26, 0.26, 305280, 305280),
        rec("lora_r1", 3e-2, 0, 0.27, 0.29, 305280, 305280),
        rec("lora_r1", 1e-1, 0, 0.15, 0.15, 305280, 305280),
        rec("lora_r1", 3e-2, 1, 0.26, 0.30, 305280, 305280),
        rec("lora_r1", 3e-2, 2, 0.28, 0.33, 305280, 305280),
        # LoRA r=8: a tie on validation goes to the smaller rate, 1e-3 (the edge: 3e-4 ran, worse)
        rec("lora_r8", 3e-4, 0, 0.25, 0.25, 2442240, 2442240),
        rec("lora_r8", 1e-3, 0, 0.27, 0.25, 2442240, 2442240),
        rec("lora_r8", 3e-3, 0, 0.27, 0.40, 2442240, 2442240),
        rec("lora_r8", 1e-2, 0, 0.20, 0.20, 2442240, 2442240),
        rec("lora_r8", 3e-2, 0, 0.10, 0.10, 2442240, 2442240),
        rec("lora_r8", 1e-3, 1, 0.26, 0.26, 2442240, 2442240),
        rec("lora_r8", 1e-3, 2, 0.28, 0.27, 2442240, 2442240),
        # AFLoRA with the GSM8K settings: half its grid
        rec("aflora_gsm8k", 1e-3, 0, 0.21, 0.21, 452000, 92760),
        rec("aflora_gsm8k", 3e-3, 0, 0.23, 0.23, 452000, 92760),
        # runs of another scale or task count for nothing
        {**rec("aflora_gsm8k", 1e-2, 0, 0.9, 0.9, 1), "scale": {**FULL, "max_steps": 10}},
        {**rec("aflora_gsm8k", 3e-2, 0, 0.9, 0.9, 1), "task": "movie_reviews"},
    ]


def write_raw(folder: Path, records: list[dict[str, Any]] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r) + "\n" for r in (raw_records() if records is None else records))
    (folder / RESULTS_FILE).write_text(lines + '{"task": "bbc_headlines", "method": "cut sh')  # a crash's half line
    return folder


def test_recipes_are_the_lm_quickstart_at_full_scale_with_each_settings_overrides(tmp_path: Path) -> None:
    quickstart = yaml.safe_load(QUICKSTART.read_text())
    recipes = {n: parse_recipe(build_recipe(TASK, n, 3e-3, 2, FULL, tmp_path / n), n) for n in PRIORITY}
    for recipe in recipes.values():
        assert recipe.model.name_or_path == quickstart["model"]["name_or_path"]
        assert recipe.seed == 2 and recipe.training.lr == 3e-3 and recipe.training.head_lr is None
        assert recipe.data.task == TASK and recipe.data.prompt_template == quickstart["data"]["prompt_template"]
        assert recipe.data.max_train_samples is None and recipe.data.max_eval_samples is None  # whole splits
        assert recipe.data.eval_splits is None  # validation (to choose) and test (to report)
        t = recipe.training
        assert (t.max_steps, t.batch_size, t.max_length, t.warmup_ratio) == (300, 8, 96, 0.06)
        assert not t.eval_on_start and t.eval_every == t.save_every == 10**9
        assert recipe.eval.max_new_tokens == 20
    paper = recipes["aflora_r4"]
    assert (paper.adapter.method, paper.adapter.rank, paper.adapter.alpha, paper.adapter.targets) == (
        "aflora",
        4,
        None,
        None,
    )
    assert resolve_policy(paper.adapter) == {"attention": "frozen", "ffn": "adaptive"}
    assert (paper.freezing.t_i, paper.freezing.t_f, paper.freezing.power) == ("20%", "40%", 3)
    gsm8k = recipes["aflora_gsm8k"]
    assert gsm8k.adapter.alpha is not None and gsm8k.adapter.alpha / gsm8k.adapter.rank == 2
    assert gsm8k.adapter.targets == {
        "attention": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        "ffn": ["mlp.up_proj", "mlp.down_proj"],
    }
    assert resolve_policy(gsm8k.adapter) == {"attention": "adaptive", "ffn": "adaptive"}
    assert (gsm8k.freezing.t_i, gsm8k.freezing.t_f, gsm8k.freezing.power) == ("30%", "30%", 2)
    seven = [name.split(".")[-1] for names in DEFAULT_TARGETS["llama"].values() for name in names]
    assert seven == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for name, rank in (("lora_r8", 8), ("lora_r1", 1)):
        lora = recipes[name].adapter
        assert (lora.method, lora.rank, lora.targets, lora.alpha) == ("lora", rank, None, None)  # alpha: the rank
        assert resolve_policy(lora) == {"attention": "trainable", "ffn": "trainable"}


def test_the_sentiment_word_task_is_the_shipped_movie_reviews_as_prompt_response_files_scored_by_exact_match(
    tmp_path: Path,
) -> None:
    raw = build_recipe(WORDS, "lora_r1", 3e-3, 2, SCALES[WORDS], tmp_path / "run")
    recipe = parse_recipe(raw, "lora_r1")
    d = recipe.data
    assert (d.task, d.format, d.metric, d.prompt_template) == (
        "custom",
        "prompt_response",
        "exact_match",
        "Review: {prompt}\nSentiment:",
    )
    assert d.max_train_samples is None and d.max_eval_samples is None and d.eval_splits is None
    assert recipe.eval.max_new_tokens == 3 and recipe.training.max_steps == 300 and recipe.adapter.rank == 1
    shipped = ROOT / "aflora_cli" / "datasets" / "movie_reviews"
    for split in ("train", "validation", "test"):
        path = Path(getattr(d, f"{split}_file"))
        assert path.parent == tmp_path / "run" / "data"
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        table = (shipped / f"{split}.tsv").read_text(encoding="utf-8").splitlines()[1:]
        assert len(rows) == len(table) == (8568 if split == "train" else 1000)
        for row, line in zip(rows, table, strict=True):
            sentence, label, _rating = line.split("\t")
            assert row == {"prompt": sentence, "response": ("negative", "positive")[int(label)]}


def test_plan_goes_in_priority_order_grid_then_seeds(tmp_path: Path) -> None:
    first_grids = [(task, name, lr, 0) for task in (TASK, WORDS) for name in PRIORITY for lr in (1e-3, 3e-3, 1e-2)]
    assert Runs([]).plan([TASK, WORDS], list(PRIORITY)) == first_grids  # task by task, in the order asked
    records = [r for r in raw_records() if (r["method"], r["seed"]) not in (("aflora_r4", 2), ("lora_r8", 1))]
    runs = Runs.from_folder(write_raw(tmp_path, records))
    assert runs.plan([TASK], list(PRIORITY)) == [
        (TASK, "aflora_r4", 1e-2, 2),
        (TASK, "lora_r8", 1e-3, 1),
        (TASK, "aflora_gsm8k", 1e-2, 0),  # the other scale's and task's runs do not count
    ]
    assert runs.plan([TASK], ["lora_r1", "lora_r8"]) == [(TASK, "lora_r8", 1e-3, 1)]
    # a best value at the grid's edge grows the grid one step past it before any seed runs
    grown = Runs([*records, rec("aflora_gsm8k", 1e-2, 0, 0.30, 0.30, 452000, 92760)])
    assert grown.grid(TASK, "aflora_gsm8k") == [1e-3, 3e-3, 1e-2, 3e-2] and grown.chosen(TASK, "aflora_gsm8k") is None
    assert grown.plan([TASK], ["aflora_gsm8k"]) == [(TASK, "aflora_gsm8k", 3e-2, 0)]
    assert Runs(records, ladder=(1e-3, 3e-3, 1e-2)).grid(TASK, "lora_r1") == [1e-3, 3e-3, 1e-2]  # smoke: no growth

    # the other task's runs count at its own scale (3 new tokens), and only there
    def as_words(r: dict[str, Any]) -> dict[str, Any]:
        metrics = {split: {"exact_match": m["rougeL"]} for split, m in r["metrics"].items()}
        return {**r, "task": WORDS, "metrics": metrics}

    words = [{**as_words(r), "scale": SCALES[WORDS]} for r in raw_records()[:6]]
    assert Runs(words).chosen(WORDS, "aflora_r4") == 1e-2 and Runs(words).chosen(TASK, "aflora_r4") is None
    assert Runs([as_words(r) for r in raw_records()[:6]]).chosen(WORDS, "aflora_r4") is None  # bbc's scale


def test_report_numbers_from_a_small_raw_file(tmp_path: Path) -> None:
    text = report(Runs.from_folder(write_raw(tmp_path)), [TASK])
    rows = text.splitlines()
    assert "| setting | lr 0.0003 | lr 0.001 | lr 0.003 | lr 0.01 | lr 0.03 | lr 0.1 | chosen |" in rows
    assert "| AFLoRA r=4 | — | 0.2000 | 0.2500 | 0.2800 | 0.2200 | — | 0.01 |" in rows
    assert "| LoRA r=1 | — | 0.1800 | 0.2400 | 0.2600 | 0.2700 | 0.1500 | 0.03 |" in rows
    assert "| LoRA r=8 | 0.2500 | 0.2700 | 0.2700 | 0.2000 | 0.1000 | — | 0.001 |" in rows
    assert "| AFLoRA r=4, authors' GSM8K settings | — | 0.2100 | 0.2300 | — | — | — | — |" in rows
    # the front, fewest average trainable parameters first
    front = [r for r in rows if r.count("|") == 10][2:]
    assert front == [
        "| LoRA r=1 | 0.03 | 3 | 0.3067 ± 0.0208 | 0.2700 ± 0.0100 | 305,280 | 305,280 | 25.0 | complete |",
        "| AFLoRA r=4 | 0.01 | 3 | 0.3100 ± 0.0100 | 0.2800 ± 0.0100 | 384,000 | 156,360 | 25.0 | complete |",
        "| AFLoRA r=4, authors' GSM8K settings | — | 0 | — | — | 452,000 | 92,760 | 25.0 | incomplete: grid 2 of 3 |",
        "| LoRA r=8 | 0.001 | 3 | 0.2600 ± 0.0100 | 0.2700 ± 0.0100 | 2,442,240 | 2,442,240 | 25.0 | complete |",
    ]
    # AFLoRA r=4 - LoRA r=1 per seed: +0.01, +0.02, -0.02; AFLoRA r=4 - LoRA r=8: +0.05, +0.06, +0.04
    assert (
        "| AFLoRA r=4 >= LoRA r=1 (about the same average count) | 384,000 vs 305,280 | +0.0100, +0.0200, -0.0200 "
        "| +0.0033 ± 0.0208 | within noise |"
    ) in rows
    assert (
        "| AFLoRA r=4 >= LoRA r=8 | 384,000 vs 2,442,240 | +0.0500, +0.0600, +0.0400 | +0.0500 ± 0.0100 | holds |"
    ) in rows
    assert (
        "| AFLoRA, authors' GSM8K settings >= LoRA r=8 | 452,000 vs 2,442,240 | — | — | "
        "not judged: AFLoRA r=4, authors' GSM8K settings incomplete |"
    ) in rows
    # 22 runs of this task and scale, 1,500 s each on two threads
    assert "| runs of bbc_headlines in front_lm.jsonl | CPU-hours (whole run x torch threads) |" in rows
    assert "| 22 | 18.3 |" in rows


def test_a_setting_without_every_seed_is_shown_incomplete_and_never_judged(tmp_path: Path) -> None:
    records = [r for r in raw_records() if (r["method"], r["seed"]) != ("lora_r1", 1)]
    text = report(Runs.from_folder(write_raw(tmp_path, records)), [TASK])
    assert "| LoRA r=1 | 0.03 | 2 | 0.3100 ± 0.0283 | 0.2750 ± 0.0071 | 305,280 | 305,280 | 25.0 | " in text
    assert "| incomplete: seeds 0, 2 of 3 |" in text
    assert "| 384,000 vs 305,280 | — | — | not judged: LoRA r=1 incomplete |" in text
    assert "| +0.0500 ± 0.0100 | holds |" in text  # the other verdicts stand


def test_plot_draws_lora_by_rank_and_aflora_points_from_partial_results(tmp_path: Path) -> None:
    records = [r for r in raw_records() if (r["method"], r["seed"]) != ("aflora_r4", 2)]
    data = lm_front_data(Runs.from_folder(write_raw(tmp_path, records)))
    assert [(p["rank"], p["complete"], p["trainable"]) for p in data["lines"][LORA]] == [
        (1, True, 305280),
        (8, True, 2442240),
    ]
    assert data["lines"][LORA][0]["mean"] == pytest.approx(0.306667, abs=1e-6)
    # AFLoRA r=4 without seed 2: seed 0's test at the chosen value, hollow; the GSM8K setting has no choice yet
    assert [(p["name"], p["complete"], p["seeds"], p["mean"]) for p in data["singles"]] == [
        ("aflora_r4", False, 1, 0.30)
    ]
    draw(data, tmp_path / "pareto-lm.png")
    assert (tmp_path / "pareto-lm.png").read_bytes()[:4] == b"\x89PNG"
    empty = lm_front_data(Runs([]), WORDS)
    assert empty["lines"][LORA] == [] and empty["singles"] == []
    draw(empty, tmp_path / "empty.png")  # nothing finished yet: still an image
    assert (tmp_path / "empty.png").read_bytes()[:4] == b"\x89PNG"


def smoke(out: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    """front_lm.py --smoke into `out` with these arguments; its output and the results file's records."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(BENCHMARKS / "front_lm.py"), "--smoke", "--out", str(out), "--threads", "1", *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, [json.loads(line) for line in (out / RESULTS_FILE).read_text().splitlines()]


def test_smoke_run_of_the_sentiment_word_task_scores_exact_match(tmp_path: Path) -> None:
    result, records = smoke(tmp_path, "--only", "lora_r1", "--tasks", WORDS)
    assert [(r["task"], r["phase"]) for r in records] == [(WORDS, "grid")] * 3 + [(WORDS, "seeds")] * 2
    for r in records:
        assert r["scale"]["max_new_tokens"] == 2 and r["steps"] == 4
        for split in ("validation", "test"):
            assert 0 <= r["metrics"][split]["exact_match"] <= 1 and "rougeL" not in r["metrics"][split]
    complete = [line for line in result.stdout.splitlines() if line.endswith("| complete |")]
    assert len(complete) == 1 and complete[0].startswith("| LoRA r=1 |")
    assert f"#### {WORDS}: the front (test exact_match" in result.stdout and TASK not in result.stdout


def test_smoke_run_writes_one_line_per_run_with_the_fields_and_resumes(tmp_path: Path) -> None:
    result, records = smoke(tmp_path, "--only", "aflora_gsm8k,lora_r1", "--tasks", TASK)
    # PRIORITY order whatever --only's: LoRA r=1's grid and seeds, then the GSM8K setting's
    order: list[tuple[str, str, int]] = []
    for name in ("lora_r1", "aflora_gsm8k"):
        order += [(name, "grid", 0)] * 3 + [(name, "seeds", 1), (name, "seeds", 2)]
    assert [(r["method"], r["phase"], r["seed"]) for r in records] == order
    fields = {"task", "method", "lr", "seed", "phase", "adapter", "freezing", "scale", "metrics", "steps", "t_i"}
    fields |= {"t_f", "trainable_average", "trainable_start", "trainable_end", "frozen_pms", "num_units"}
    fields |= {"train_time_s", "wall_s", "commit", "machine"}
    for r in records:
        assert set(r) == fields
        assert r["task"] == TASK and r["steps"] == 4 and r["scale"]["model"] == str(tmp_path / "tiny-llama")
        assert set(r["metrics"]) == {"validation", "test"} and "rougeL" in r["metrics"]["test"]
        assert r["wall_s"] >= r["train_time_s"] > 0 and r["machine"]["torch_threads"] == 1
    # LoRA r=1 on the tiny LLaMA's seven linear types (hidden 48, key/value 24, FFN 96), 2 layers:
    # (96 + 72 + 72 + 96 + 144 + 144 + 144) x 2 = 1,536 entries of A and B, trainable throughout
    for r in records[:5]:
        assert r["adapter"] == {"method": "lora", "rank": 1} and r["freezing"] == {}
        assert r["trainable_start"] == r["trainable_end"] == r["trainable_average"] == 1536
    # the GSM8K setting: q, k, v, up, down only, A and B adaptive, all frozen by the last step of 4 (t_i = t_f = 1)
    for r in records[5:]:
        assert r["adapter"]["alpha"] == 8 and r["freezing"] == {"power": 2, "t_i": "30%", "t_f": "30%"}
        assert (r["t_i"], r["t_f"]) == (1, 1)
        assert r["num_units"] == r["frozen_pms"] == 2 * 5 * 2
        vectors = 2 * ((48 + 24 + 24 + 96 + 48) + 5 * 4)  # lambda_b (out features) + lambda_d (rank) per module
        assert r["trainable_end"] == vectors and r["trainable_start"] == vectors + 2 * (96 + 72 + 72 + 144 + 144) * 4
        assert r["trainable_end"] < r["trainable_average"] < r["trainable_start"]
    complete = [line for line in result.stdout.splitlines() if line.endswith("| complete |")]
    assert [line.split(" | ")[0] for line in complete] == ["| LoRA r=1", "| AFLoRA r=4, authors' GSM8K settings"]

    again, records_again = smoke(tmp_path, "--only", "aflora_gsm8k,lora_r1", "--tasks", TASK)
    assert records_again == records  # nothing ran again
    assert again.stdout == result.stdout.split("\n", len(records))[-1]  # only the report, the same one
