"""`aflora train` as a whole process against a plain PEFT LoRA loop doing the same work, timed alternately.

    python benchmarks/whole_process.py [--pairs 3] [--steps 120] [--lean] [--set KEY=VALUE ...] [--json FILE]

What A and B are, `--lean` and `--set`: benchmarks/RESULTS.md, "How whole_process.py compares".
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import MOVIE_REVIEWS, OFFLINE, QUICKSTART, ROOT, compile_bytecode, machine, timed, train_command, write_json

ENV = {**OFFLINE, "TOKENIZERS_PARALLELISM": "false"}


def _read(split: str) -> tuple[list[str], list[int]]:
    with (MOVIE_REVIEWS / f"{split}.tsv").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [row["sentence"] for row in rows], [int(row["label"]) for row in rows]


def peft_loop(plan: dict[str, Any]) -> None:
    """The plain loop a PEFT user writes; `plan` holds the rows, steps and settings shared with A."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(plan["seed"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(plan["model_dir"])
    model = transformers.AutoModelForSequenceClassification.from_pretrained(plan["model_dir"], num_labels=2)
    lora = LoraConfig(r=8, lora_alpha=8, target_modules=plan["targets"], modules_to_save=["classifier"])
    model = get_peft_model(model, lora)
    texts, labels = _read("train")
    rows = plan["train_rows"]
    train = tokenizer([texts[i] for i in rows], truncation=True, max_length=plan["max_length"])
    train_labels = [labels[i] for i in rows]
    splits = {}
    for split in ("validation", "test"):
        split_texts, split_labels = _read(split)
        chosen = plan["eval_rows"][split] or range(len(split_texts))
        split_texts, split_labels = [split_texts[i] for i in chosen], [split_labels[i] for i in chosen]
        splits[split] = (tokenizer(split_texts, truncation=True, max_length=plan["max_length"]), split_labels)
    collate = transformers.DataCollatorWithPadding(tokenizer)
    head = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n]
    optimizer = torch.optim.AdamW([{"params": rest, "lr": plan["lr"]}, {"params": head, "lr": plan["head_lr"]}])
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, plan["warmup_steps"], plan["steps"])
    batch, per_epoch = plan["batch_size"], math.ceil(len(rows) / plan["batch_size"])

    def rows_of(encoded: Any, index: list[int], targets: list[int]) -> list[dict[str, Any]]:
        return [{**{key: encoded[key][i] for key in encoded}, "labels": targets[i]} for i in index]

    def evaluate() -> None:
        model.eval()
        with torch.no_grad():
            for encoded, targets in splits.values():
                right = 0
                for start in range(0, len(targets), 64):
                    chunk = collate(rows_of(encoded, list(range(start, min(start + 64, len(targets)))), targets))
                    labels_ = chunk.pop("labels")
                    right += int((model(**chunk).logits.argmax(-1) == labels_).sum())
                print(f"accuracy {right / len(targets):.4f}", flush=True)
        model.train()

    model.train()
    step = 0
    while step < plan["steps"]:
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(plan["seed"] + step)).tolist()
        for start in range(0, len(order), batch):
            inputs = collate(rows_of(train, order[start : start + batch], train_labels))
            model(**inputs).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == plan["steps"] or (step % per_epoch == 0 and not plan["lean"]):
                evaluate()
                if not plan["lean"]:
                    model.save_pretrained(plan["output_dir"])
            if step == plan["steps"]:
                break


LEAN_EVAL_ROWS = 512
LEAN_OVERRIDES = ["training.eval_every=1000000", "training.save_every=1000000"]
LEAN_OVERRIDES += [f"data.max_eval_samples={LEAN_EVAL_ROWS}"]


def make_plan(steps: int, folder: Path, lean: bool) -> dict[str, Any]:
    """A's settings as B needs them: the same row subsets, steps, batch, length and learning rates."""
    import yaml

    from aflora_cli.engine.base_model import model_dir
    from aflora_cli.tasks.tables import subset_rows

    recipe = yaml.safe_load(QUICKSTART.read_text())
    texts, _ = _read("train")
    rows = subset_rows(len(texts), recipe["data"]["max_train_samples"], recipe["seed"])
    training = recipe["training"]
    return {
        "seed": recipe["seed"],
        "model_dir": str(model_dir(recipe["model"]["name_or_path"])),
        "targets": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
        "train_rows": rows if rows is not None else list(range(len(texts))),
        "lean": lean,
        "eval_rows": {  # the rows `max_eval_samples` draws in A (data.seed is unset: the run's seed)
            split: subset_rows(len(_read(split)[0]), LEAN_EVAL_ROWS, recipe["seed"]) if lean else None
            for split in ("validation", "test")
        },
        "steps": steps,
        "batch_size": training["batch_size"],
        "max_length": training["max_length"],
        "lr": training["lr"],
        "head_lr": training.get("head_lr") or training["lr"],
        "warmup_steps": math.ceil(training["warmup_ratio"] * steps),
        "output_dir": str(folder / "peft"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--lean", action="store_true", help="evaluate 512 rows per split once at the end")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", help="write the measurements here")
    parser.add_argument("--peft-loop", metavar="PLAN", help=argparse.SUPPRESS)  # B's own process
    args = parser.parse_args()
    if args.peft_loop:
        peft_loop(json.loads(Path(args.peft_loop).read_text()))
        return 0
    compile_bytecode()
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        plan_file = folder / "plan.json"
        plan_file.write_text(json.dumps(make_plan(args.steps, folder, args.lean)))
        overrides = [*(LEAN_OVERRIDES if args.lean else []), *args.overrides]
        for number in range(args.pairs):
            aflora = train_command(QUICKSTART, f"{tmp}/a{number}", f"training.max_steps={args.steps}", *overrides)
            peft = [sys.executable, str(Path(__file__).resolve()), "--peft-loop", str(plan_file)]
            if number % 2 == 0:
                a, b = timed(aflora, env=ENV, cwd=ROOT), timed(peft, env=ENV, cwd=ROOT)
            else:
                b, a = timed(peft, env=ENV, cwd=ROOT), timed(aflora, env=ENV, cwd=ROOT)
            pairs.append({"aflora_s": a, "peft_s": b, "ratio": a / b})
            print(f"pair {number + 1}: aflora train {a:.1f} s, PEFT loop {b:.1f} s, ratio {a / b:.3f}", flush=True)
    ratio = statistics.median(p["ratio"] for p in pairs)
    print(f"median ratio aflora / PEFT: {ratio:.3f} (target <= 0.85: {'met' if ratio <= 0.85 else 'not met'})")
    if args.json:
        result = {"steps": args.steps, "lean": args.lean, "overrides": overrides, "pairs": pairs}
        write_json(args.json, result | {"median_ratio": ratio, "machine": machine()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
