"""The checkpoint's file names and its JSON manifest: what `aflora inspect` reads without torch or a model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from aflora_cli.errors import AfloraError

FORMAT_VERSION = 1
WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "adapter_config.json"
STATE_FILE = "training_state.pt"
FREEZER_FILE = "aflora_freezer.pt"  # the freezer state AfloraCallback keeps in a Trainer checkpoint
MATRICES = ("lora_A", "lora_B")  # the projection matrices of an adapter, as the freeze log names them
CHECKSUMS_KEY = "checksums"  # manifest entry: {file name: "sha256:<hex>"} of each weights/state file
CHECKED_FILES = (WEIGHTS_FILE, STATE_FILE, FREEZER_FILE)


def read_manifest(path: Path) -> dict[str, Any]:
    """The checkpoint's manifest, or one clear error if `path` is not a readable checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise AfloraError(f"{path}: not a checkpoint directory")
    file = path / MANIFEST_FILE
    if not file.is_file():
        raise AfloraError(f"{path}: not an aflora checkpoint ({MANIFEST_FILE} is missing)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AfloraError(f"{file}: damaged manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise AfloraError(f"{file}: format_version {found!r}, expected {FORMAT_VERSION}")
    return manifest


def file_checksum(file: Path) -> str:
    """`sha256:<hex>` of a file's bytes."""
    digest = hashlib.sha256()
    with Path(file).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def checksums_of(folder: Path) -> dict[str, str]:
    """The checksum of each weights/state file in `folder`, for its manifest."""
    return {name: file_checksum(folder / name) for name in CHECKED_FILES if (Path(folder) / name).is_file()}


def verify_checksums(folder: Path, manifest: dict[str, Any]) -> None:
    """One clear error naming the first weights/state file that is truncated, empty or altered since its
    manifest was written (a checkpoint from before checksums were recorded has nothing to check)."""
    recorded = manifest.get(CHECKSUMS_KEY)
    if not isinstance(recorded, dict):
        return
    for name, expected in recorded.items():
        file = Path(folder) / str(name)
        if not file.is_file():
            continue  # not needed by every reader (eval has no use for the training state); who needs it says so
        size = file.stat().st_size
        if file_checksum(file) != expected:
            what = "empty" if size == 0 else f"damaged: {size} bytes that do not match the manifest's checksum"
            raise AfloraError(f"{file}: {what} (truncated or altered since it was saved)")
