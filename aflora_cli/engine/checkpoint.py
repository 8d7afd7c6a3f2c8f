"""The checkpoint directory: adapter weights in safetensors, a JSON manifest, written atomically."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from aflora_cli.engine.durable import fsync_path, fsync_tree, pid_alive, uninterrupted, write_text_durably
from aflora_cli.engine.faults import fault_point
from aflora_cli.engine.inject import adapter_modules
from aflora_cli.engine.manifest import CHECKSUMS_KEY, FORMAT_VERSION, MANIFEST_FILE, WEIGHTS_FILE, checksums_of
from aflora_cli.errors import AfloraError, first_line

_ADAPTER_TENSORS = ("lora_A", "lora_B", "lambda_d", "lambda_b")


def adapter_parameters(model: nn.Module, head_names: list[str]) -> dict[str, nn.Parameter]:
    """`<module>.lora_A/.lora_B/.lambda_d/.lambda_b` of every adapter plus the head, by parameter name: what a
    checkpoint holds."""
    found: dict[str, nn.Parameter] = {}
    for name, module in adapter_modules(model).items():
        for tensor_name in _ADAPTER_TENSORS:
            tensor = getattr(module, tensor_name)
            if tensor is not None:
                found[f"{name}.{tensor_name}"] = tensor
    params = dict(model.named_parameters())
    found.update({name: params[name] for name in head_names})
    return found


def adapter_state(model: nn.Module, head_names: list[str]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (`adapter_parameters`), detached, on the CPU."""
    return {
        name: param.detach().to("cpu").contiguous() for name, param in adapter_parameters(model, head_names).items()
    }


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final` to fill; on success it replaces `final`.

    Kill-safe at every instant: the filled folder is fsynced, then `final` is renamed to `.<name>.old-…` and
    the new folder renamed into place (both renames held back from Ctrl-C/SIGTERM, the folder fsynced). A kill
    between the two renames leaves the complete predecessor, which `find_checkpoint` and `restore` find.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; a checkpoint gets the usual permissions
    try:
        yield tmp
        fault_point("fsync")
        fsync_tree(tmp)
        old = None
        with uninterrupted():
            try:
                if final.exists():
                    old = final.parent / f".{final.name}.old-{os.getpid()}-{time.time_ns()}"
                    final.rename(old)
                    fault_point("moved_old")
                tmp.rename(final)
                fsync_path(final.parent)
            except BaseException:
                if old is not None and not final.exists():
                    old.rename(final)  # put the previous folder back
                raise
            fault_point("renamed")
        _remove_leftovers(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _siblings(final: Path, kind: str) -> list[Path]:
    """`.<name>.old-…` (kind "old") or `.<name>.tmp-…` (kind "tmp") folders beside `final`."""
    return sorted(p for p in final.parent.glob(f".{final.name}.{kind}-*") if p.is_dir())


def _writer_pid(folder: Path) -> int | None:
    """The pid in a leftover's name `.<name>.<kind>-<pid>-…` (None for names of older versions)."""
    field = folder.name.rsplit(".", 1)[-1].split("-")
    return int(field[1]) if len(field) > 2 and field[1].isdigit() else None


def _remove_leftovers(final: Path) -> None:
    """With `final` in place, its predecessors are obsolete, and so are half-written folders of dead writers."""
    for folder in _siblings(final, "old"):
        shutil.rmtree(folder, ignore_errors=True)
    for folder in _siblings(final, "tmp"):
        pid = _writer_pid(folder)
        if pid is not None and pid != os.getpid() and not pid_alive(pid):
            shutil.rmtree(folder, ignore_errors=True)


def find_checkpoint(final: Path) -> Path | None:
    """`final` if it holds a complete checkpoint; else its newest complete predecessor `.<name>.old-…` (left by a
    kill between the two renames of a save); else None."""
    final = Path(final)
    if (final / MANIFEST_FILE).is_file():
        return final
    olds = [p for p in _siblings(final, "old") if (p / MANIFEST_FILE).is_file()]
    return max(olds, key=lambda p: p.name.rsplit("-", 1)[-1].zfill(24), default=None)


def restore(final: Path) -> Path | None:
    """Put a predecessor found by `find_checkpoint` back in `final`'s place (only the one writer of the folder
    may: hold its lock); returns the checkpoint, or None if there is none."""
    found = find_checkpoint(final)
    if found is not None and found != final and not final.exists():
        with uninterrupted():
            found.rename(final)
            fsync_path(final.parent)
        found = final
    return found


def save_checkpoint(
    path: Path,
    model: nn.Module,
    head_names: list[str],
    manifest: dict[str, Any],
    extra: Callable[[Path], None] | None = None,
) -> None:
    """Write weights and manifest (and whatever `extra` writes into the folder) as one atomic directory; a full
    or read-only disk is one clear error, the previous checkpoint left as it was."""
    try:
        with atomic_directory(path) as tmp:
            write_checkpoint_files(tmp, model, head_names, manifest, extra)
    except OSError as err:
        kept = f"{path} still holds the previous checkpoint" if path.is_dir() else "nothing was written"
        raise AfloraError(f"could not write the checkpoint {path}: {err.strerror or err}; {kept}") from None


def write_checkpoint_files(
    folder: Path,
    model: nn.Module,
    head_names: list[str],
    manifest: dict[str, Any],
    extra: Callable[[Path], None] | None = None,
) -> None:
    """Write the checkpoint's files into an existing folder (a Trainer's checkpoint, say): each file under a
    temporary name, flushed and renamed into place, the manifest last with the checksum of each weights/state
    file, so a folder with a manifest is always complete and a damaged file is found."""
    folder = Path(folder)
    weights = folder / f".{WEIGHTS_FILE}.tmp"
    fault_point("weights")
    save_file(adapter_state(model, head_names), str(weights), metadata={"format": "pt"})
    fsync_path(weights)
    weights.replace(folder / WEIGHTS_FILE)
    if extra is not None:
        fault_point("extra")
        extra(folder)
    fault_point("manifest")
    record = {"format_version": FORMAT_VERSION, **manifest, CHECKSUMS_KEY: checksums_of(folder)}
    write_text_durably(folder / MANIFEST_FILE, json.dumps(record, indent=2) + "\n")


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
