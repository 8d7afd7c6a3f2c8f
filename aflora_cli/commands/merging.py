"""`aflora merge`: a checkpoint as a plain transformers model, or as a PEFT LoRA adapter.

`transformers` folds s·Λb·B·Λd·A into W0 of every adapted layer, puts the plain layer back in the
adapter's place and saves the whole model (config — with the task's labels for classification —,
safetensors weights with any trained head, tokenizer, generation config for text models): the task family's
Auto class (`AutoModelForSequenceClassification`, `AutoModelForCausalLM`, `AutoModelForSeq2SeqLM`) loads it
with `from_pretrained(DIR)`, without aflora.

`peft` writes the LoRA form of the same update, which PEFT loads on top of the base model:
lora_A = diag(Λd)·A, lora_B = diag(Λb)·B (A and B as they are for method `lora`), lora_alpha = s·r so
that PEFT's scaling lora_alpha / r equals ours, the head in `modules_to_save`. aflora does not need peft
to write it: the file layout is PEFT's (`base_model.model.<module>.lora_A.weight`, head parameters under
`base_model.model.<name>`).

`gguf` writes the merged model as one GGUF file for llama.cpp (LLaMA family; `gguf_export.py`).

Each is written with a model card (README.md, `adapted/model_card.py`) unless `card=False`, into a temporary
sibling of DIR and renamed into place, so a failure leaves nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel

from aflora_cli.adapted.loading import LoadedCheckpoint, load_checkpoint
from aflora_cli.adapted.model_card import write_card
from aflora_cli.engine.checkpoint import atomic_directory
from aflora_cli.engine.inject import adapter_modules, fold_adapters
from aflora_cli.engine.storage import is_quantized
from aflora_cli.errors import AfloraError

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


FORMATS = ("transformers", "peft", "gguf")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class MergeResult:
    out: str
    format: str
    dtype: str
    modules: int
    files: list[str]
    auto_class: str
    gguf_file: str | None = None
    # merged from a quantized base: max |logit difference| from the quantized adapter model on two fixed
    # sentences, as a fraction of its largest |logit|
    logit_gap: float | None = None


# ------------------------------------------------------------------------------------------ the output folder


def check_output(out: Path, force: bool, checkpoint: Path) -> None:
    """Refuse an output folder that is not empty (without `force`), not creatable or not writable."""
    resolved, source = out.expanduser().resolve(), Path(checkpoint).resolve()
    if resolved == source or resolved in source.parents or source in resolved.parents:
        raise AfloraError(f"--out {out}: overlaps the checkpoint {checkpoint}; choose another directory")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise AfloraError(f"--out {out}: exists and is not a directory")
        if any(out.iterdir()) and not force:
            raise AfloraError(f"--out {out}: directory is not empty; pass --force to replace it")
    ancestor = resolved.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise AfloraError(f"--out {out}: cannot be created ({ancestor} is not a directory)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise AfloraError(f"--out {out}: {ancestor} is not writable")


def write_directory(out: Path, fill: Callable[[Path], None]) -> list[str]:
    """Fill a temporary sibling of `out` and rename it into place; on any failure nothing is left behind."""
    out = out.expanduser()
    created = []
    parent = out.resolve().parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    try:
        with atomic_directory(out) as tmp:
            fill(tmp)
            files = sorted(p.name for p in tmp.iterdir())
    except BaseException as err:
        for folder in created:  # deepest first; only folders we made, and only if still empty
            try:
                folder.rmdir()
            except OSError:
                break
        if isinstance(err, OSError):
            raise AfloraError(f"--out {out}: could not write ({err.strerror or err})") from None
        raise
    return files


# ---------------------------------------------------------------------------------------------- the formats


def merged_model(loaded: LoadedCheckpoint, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The loaded model with every adapter folded into its W0 (in fp32) and replaced by that plain nn.Linear,
    then cast to `dtype`. A quantized base is first dequantized with bitsandbytes' own functions (through
    transformers' `dequantize`): a merged model cannot stay 4- or 8-bit without quantizing it again."""
    model = loaded.adapted.model
    if is_quantized(model):
        model.dequantize()  # type: ignore[operator]
    model = fold_adapters(model.float())
    return cast(PreTrainedModel, model.to(dtype))


SAMPLE_TEXTS = ("The film is warm, funny and clever.", "Shares fell sharply on Monday after the report.")


def sample_logits(model: torch.nn.Module, tokenizer: Any) -> torch.Tensor:
    """The model's logits on two fixed sentences (an encoder-decoder reads them back as its decoder input)."""
    batch = dict(tokenizer(list(SAMPLE_TEXTS), return_tensors="pt", padding=True))
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        batch["decoder_input_ids"] = batch["input_ids"]
    device = next(p.device for p in model.parameters())
    with torch.no_grad():
        logits = model.eval()(**{k: v.to(device) for k, v in batch.items()}).logits
    return logits.float().cpu()


def peft_tensors(loaded: LoadedCheckpoint, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PEFT LoRA tensors: lora_A = diag(Λd)·A, lora_B = diag(Λb)·B, and the head, under PEFT's key names."""
    model = loaded.adapted.model
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in adapter_modules(model).items():
            down, up = module.lora_A.float(), module.lora_B.float()
            if module.lambda_d is not None:
                down = module.lambda_d.float().unsqueeze(1) * down
                up = module.lambda_b.float().unsqueeze(1) * up
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = down
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = up
        params = dict(model.named_parameters())
        for name in loaded.adapted.head_names:
            tensors[f"{PEFT_PREFIX}{name}"] = params[name].float()
    return {name: tensor.to(dtype).cpu().contiguous() for name, tensor in tensors.items()}


def peft_config(loaded: LoadedCheckpoint) -> dict[str, Any]:
    """A PEFT LoRA config (the family's task type) whose scaling lora_alpha / r equals the adapter's scaling."""
    manifest, recipe = loaded.manifest, loaded.recipe
    rank = manifest["rank"]
    alpha = float(manifest["scaling"]) * rank
    head_modules = list(dict.fromkeys(name.split(".")[0] for name in loaded.adapted.head_names))
    modules = adapter_modules(loaded.adapted.model)
    transposed = {module.transposed for module in modules.values()}
    if len(transposed) > 1:
        raise AfloraError(
            "--format peft: the adapted layers mix nn.Linear and GPT-2-style Conv1D, but PEFT's fan_in_fan_out "
            "is one setting for all of them; use --format transformers"
        )
    return {
        "peft_type": "LORA",
        "task_type": loaded.task.peft_task_type,
        "base_model_name_or_path": loaded.base_name,
        "revision": recipe.model.revision,
        "r": rank,
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": recipe.adapter.dropout,
        "target_modules": list(modules),
        "modules_to_save": head_modules or None,
        "bias": "none",
        "fan_in_fan_out": transposed == {True},  # Conv1D keeps W0 as in × out
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        # how the base was loaded in training (PEFT ignores the key): dtype and bitsandbytes quantization
        "aflora_base_storage": loaded.recipe.model.storage().describe(),
    }


def merge_checkpoint(
    path: str | Path,
    out: str | Path,
    *,
    format: str = "transformers",
    dtype: str | None = None,
    force: bool = False,
    base: str | None = None,
    card: bool = True,
    gguf_type: str | None = None,
) -> MergeResult:
    """Write checkpoint `path` to `out` as a merged transformers model, a PEFT adapter or a GGUF file, with a
    model card unless `card` is False. `dtype` of the saved weights (not GGUF): default fp32, or bf16 for a
    model merged from a quantized base."""
    path, out = Path(path), Path(out).expanduser()
    if format not in FORMATS:
        raise AfloraError(f"--format {format}: expected one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in TORCH_DTYPES:
        raise AfloraError(f"--dtype {dtype}: expected one of {', '.join(TORCH_DTYPES)}")
    if gguf_type is not None and format != "gguf":
        raise AfloraError("--gguf-type is for --format gguf; --dtype sets the other formats' precision")
    if dtype is not None and format == "gguf":
        raise AfloraError("--dtype is for --format transformers or peft; --gguf-type sets a GGUF file's precision")
    check_output(out, force, path)
    if format == "gguf":
        return _merge_gguf(path, out, gguf_type, base, card)
    loaded = load_checkpoint(path, base)
    quantized = is_quantized(loaded.adapted.model)
    dtype = dtype or ("bf16" if quantized and format == "transformers" else "fp32")
    torch_dtype = TORCH_DTYPES[dtype]
    logit_gap = None
    modules = len(adapter_modules(loaded.adapted.model))
    if format == "peft":
        tensors = peft_tensors(loaded, torch_dtype)
        config = peft_config(loaded)

        def fill(folder: Path) -> None:
            save_file(tensors, str(folder / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
            (folder / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            if card:
                write_card(folder, loaded.manifest, "peft", dtype=dtype)

    else:
        tokenizer = loaded.adapted.tokenizer
        before = sample_logits(loaded.adapted.model, tokenizer) if quantized else None
        model = merged_model(loaded, torch_dtype)
        if before is not None:
            logit_gap = float((sample_logits(model, tokenizer) - before).abs().max() / before.abs().max())

        def fill(folder: Path) -> None:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            if card:
                write_card(folder, loaded.manifest, "transformers", dtype=dtype)

    files = write_directory(out, fill)
    return MergeResult(str(out), format, dtype, modules, files, loaded.task.auto_class, logit_gap=logit_gap)


def _merge_gguf(path: Path, out: Path, gguf_type: str | None, base: str | None, card: bool) -> MergeResult:
    """The merged model (folded in fp32) as one GGUF file; a family it cannot write is refused before folding."""
    from aflora_cli.commands import gguf_export

    gguf_type = gguf_type or gguf_export.DEFAULT_GGUF_TYPE
    if gguf_type not in gguf_export.GGUF_TYPES:
        raise AfloraError(f"--gguf-type {gguf_type}: expected one of {', '.join(gguf_export.GGUF_TYPES)}")
    gguf_export.check_installed()
    loaded = load_checkpoint(path, base)
    modules = len(adapter_modules(loaded.adapted.model))
    gguf_export.family_of(loaded.adapted.model)  # one line naming what it can write, before any folding
    model = merged_model(loaded, torch.float32)
    name = f"{loaded.base_name.rstrip('/').split('/')[-1].removesuffix('.gguf')}-aflora-{loaded.task.name}"
    file_name = gguf_export.gguf_file_name(gguf_type)

    def fill(folder: Path) -> None:
        gguf_export.write_gguf(model, loaded.adapted.tokenizer, folder / file_name, gguf_type, name)
        if card:
            write_card(folder, loaded.manifest, "gguf", dtype=gguf_type, gguf_file=file_name)

    files = write_directory(out, fill)
    return MergeResult(str(out), "gguf", gguf_type, modules, files, loaded.task.auto_class, file_name)
