"""The checkpoint directory: adapter weights in safetensors, a JSON manifest, written atomically."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from aflora_cli.engine.inject import adapter_modules
from aflora_cli.engine.manifest import FORMAT_VERSION, MANIFEST_FILE, WEIGHTS_FILE
from aflora_cli.errors import AfloraError, first_line

_ADAPTER_TENSORS = ("lora_A", "lora_B", "lambda_d", "lambda_b")


def adapter_state(model: nn.Module, head_names: list[str]) -> dict[str, torch.Tensor]:
    """`<module>.lora_A/.lora_B/.lambda_d/.lambda_b` of every adapter plus the head by parameter name."""
    state: dict[str, torch.Tensor] = {}
    for name, module in adapter_modules(model).items():
        for tensor_name in _ADAPTER_TENSORS:
            tensor = getattr(module, tensor_name)
            if tensor is not None:
                state[f"{name}.{tensor_name}"] = tensor.detach()
    params = dict(model.named_parameters())
    state.update({name: params[name].detach() for name in head_names})
    return {name: tensor.to("cpu").contiguous() for name, tensor in state.items()}


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final` to fill; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; a checkpoint gets the usual permissions
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def save_checkpoint(
    path: Path,
    model: nn.Module,
    head_names: list[str],
    manifest: dict[str, Any],
    extra: Callable[[Path], None] | None = None,
) -> None:
    """Write weights and manifest (and whatever `extra` writes into the folder) as one atomic directory."""
    with atomic_directory(path) as tmp:
        write_checkpoint_files(tmp, model, head_names, manifest, extra)


def write_checkpoint_files(
    folder: Path,
    model: nn.Module,
    head_names: list[str],
    manifest: dict[str, Any],
    extra: Callable[[Path], None] | None = None,
) -> None:
    """Write the checkpoint's files into an existing folder (a Trainer's checkpoint, say): each file under a
    temporary name renamed into place, the manifest last, so a folder with a manifest is always complete."""
    folder = Path(folder)
    weights = folder / f".{WEIGHTS_FILE}.tmp"
    save_file(adapter_state(model, head_names), str(weights), metadata={"format": "pt"})
    weights.replace(folder / WEIGHTS_FILE)
    if extra is not None:
        extra(folder)
    text = json.dumps({"format_version": FORMAT_VERSION, **manifest}, indent=2) + "\n"
    written = folder / f".{MANIFEST_FILE}.tmp"
    written.write_text(text, encoding="utf-8")
    written.replace(folder / MANIFEST_FILE)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, or one clear error if the file is missing or damaged."""
    file = Path(path) / WEIGHTS_FILE
    if not file.is_file():
        raise AfloraError(f"{path}: {WEIGHTS_FILE} is missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise AfloraError(f"{file}: damaged weights file ({err})") from None


def read_state(file: Path) -> dict[str, Any]:
    """A training-state file (`torch.save` of tensors, numbers, strings and containers), read with torch's
    weights-only loader: checkpoints travel, and a full unpickle would run whatever their author put in them.
    Every state file aflora writes holds only those types, so anything else means the file was altered."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global:" not in str(err):  # not a pickle of any kind: a damaged or foreign file
            raise AfloraError(f"{file}: damaged training-state file (not a torch.save file)") from None
        found = str(err).split("Unsupported global:", 1)[1].strip().splitlines()[0].rstrip(".")[:120]
        raise AfloraError(
            f"{file}: holds an object aflora does not load ({found}); unpickling it could run code its author "
            "put there, and aflora never writes one: use a checkpoint from a source you trust"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise AfloraError(f"{file}: damaged training-state file ({first_line(err)})") from None
    if not isinstance(state, dict):
        raise AfloraError(f"{file}: damaged training-state file (a {type(state).__name__}, expected a mapping)")
    return state


def load_weights_into(model: nn.Module, tensors: dict[str, torch.Tensor], head_names: list[str], source: Path) -> None:
    """Copy checkpoint tensors into the adapted model; every name and shape must match exactly."""
    expected = adapter_state(model, head_names)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise AfloraError(f"{source}: weights do not fit this model ({what})")
    params = dict(model.named_parameters())  # adapter tensors are parameters named `<module>.lora_A` etc.
    for name, tensor in tensors.items():  # check every shape first: a failed load must not half-load the model
        if params[name].shape != tensor.shape:
            raise AfloraError(
                f"{source}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(params[name].shape)}"
            )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
