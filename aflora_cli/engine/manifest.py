"""The checkpoint's file names and its JSON manifest: what `aflora inspect` reads without torch or a model."""

from __future__ import annotations

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
