"""What the adapters cost per step on the quickstart's batches, against the floor that every method pays.

    python benchmarks/step_floor.py [--steps 30] [--json FILE]

The floor is the frozen model with only the head training and gradients flowing back through every layer:
the forward and the backward to each layer's input that any method adapting every layer computes at least.
In one process, on the quickstart's first training batches (aflora's rows, order and collation), each model
takes one AdamW step per batch in turn: the floor; AFLoRA as it starts (FFN PMs trainable and scored by the
freezer, attention PMs frozen); AFLoRA once every PM is frozen (vectors and head train); PEFT LoRA r = 8 on
the six linear types plus the head. Medians over `--steps` batches after two warm-up batches. Run it on a
quiet machine; `whole_process.py` says what these steps add up to.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from whole_process import make_plan, quickstart

from common import machine, offline_and_quiet


def build_models(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The four models (name → (model, per-step hook)) and the quickstart's training batches."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from aflora_cli.recipe import parse_recipe
    from aflora_cli.trainer import Trainer, epoch_batches

    raw = quickstart()
    raw["output_dir"] = str(folder / "aflora")
    trainer = Trainer(parse_recipe(raw, "quickstart"))
    trainer.prepare()
    collate = trainer.task.collate(trainer.adapted.tokenizer)
    order = epoch_batches(len(trainer.train_set), 0, trainer.recipe.seed, 0, 1, trainer.recipe.training.batch_size)
    batches = [collate([trainer.train_set[i] for i in rows]) for rows in order]

    aflora = trainer.model
    all_frozen = copy.deepcopy(aflora)
    for name, param in all_frozen.named_parameters():
        if ".lora_A" in name or ".lora_B" in name:
            param.requires_grad_(False)
    plan = make_plan(1, folder)

    def base() -> Any:
        return AutoModelForSequenceClassification.from_pretrained(plan["model_dir"], num_labels=2)

    floor = base()
    for name, param in floor.named_parameters():
        param.requires_grad_(name.startswith("classifier."))
    floor.get_input_embeddings().register_forward_hook(lambda module, inputs, out: out.requires_grad_())
    lora = LoraConfig(r=8, lora_alpha=8, target_modules=plan["targets"], modules_to_save=["classifier"])
    peft = get_peft_model(base(), lora)
    step = {"n": 0}

    def score() -> None:
        trainer.freezer.update_scores(step["n"])
        step["n"] += 1

    models = {
        "floor (frozen model, head only)": (floor, None),
        "AFLoRA, start (FFN PMs trainable, scored)": (aflora, score),
        "AFLoRA, every PM frozen": (all_frozen, None),
        "PEFT LoRA r=8": (peft, None),
    }
    out = {}
    for name, (model, hook) in models.items():
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        out[name] = (model, torch.optim.AdamW(trainable, lr=1e-4), hook)
    return out, batches


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", help="write the measurements here")
    args = parser.parse_args()
    offline_and_quiet()
    with tempfile.TemporaryDirectory() as tmp:
        models, batches = build_models(Path(tmp))
        if len(batches) < args.steps + 2:
            raise SystemExit(f"--steps: at most {len(batches) - 2} (the quickstart's batches per epoch, less 2)")
        times: dict[str, list[float]] = {name: [] for name in models}
        for number, batch in enumerate(batches[: args.steps + 2]):
            for name, (model, optimizer, hook) in models.items():
                start = time.perf_counter()
                model(**batch).loss.backward()
                if hook is not None:
                    hook()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if number >= 2:
                    times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    floor, peft = medians["floor (frozen model, head only)"], medians["PEFT LoRA r=8"]
    print("| model | median step (s) | / floor | / PEFT LoRA |\n|---|---:|---:|---:|")
    for name, value in medians.items():
        print(f"| {name} | {value:.3f} | {value / floor:.2f} | {value / peft:.2f} |")
    if args.json:
        result = {"steps": args.steps, "median_step_s": medians, "machine": machine()}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
