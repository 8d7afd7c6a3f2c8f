"""The training recipe: typed sections read from YAML, `key.sub=value` overrides, validation in one place.

The `adapter` and `freezing` sections are the engine's own settings (`engine/config.py`); the recipe adds the
base model, the data, the optimisation and evaluation settings around them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from aflora_cli.engine.config import AdapterConfig, BaseDtype, FreezingConfig, QuantizationConfig
from aflora_cli.errors import AfloraError

if TYPE_CHECKING:  # storage imports torch; reading a recipe must not (`aflora train --dry-run`, `inspect`)
    from aflora_cli.engine.storage import BaseStorage


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """The base model: a hub id, a local directory, a `.gguf` file, or `package:<module>/<file>` (a model file
    inside an installed Python package). `gguf_file` names a GGUF file inside a hub repo or directory; GGUF
    weights are dequantised to fp32 on load. `dtype` is what the frozen base's weights are stored in, and
    `quantization` stores its linear layers in 4 or 8 bits (bitsandbytes); adapters and head stay fp32.
    `trust_remote_code` lets a model folder's own Python code run, `allow_bin_weights` lets its weights load
    from pickled `.bin` files: both stay off unless you trust where the model came from."""

    name_or_path: str
    revision: str | None = None
    gguf_file: str | None = None
    dtype: BaseDtype = "fp32"
    quantization: QuantizationConfig | None = None
    trust_remote_code: bool = False
    allow_bin_weights: bool = False

    def storage(self) -> BaseStorage:
        from aflora_cli.engine.storage import BaseStorage

        return BaseStorage(self.dtype, self.quantization, self.trust_remote_code, self.allow_bin_weights)


class DataConfig(_Section):
    """Which data to train and evaluate on.

    `task` is a classification task (GLUE: cola, sst2, mrpc, qnli, stsb, rte, mnli, qqp; the shipped
    `movie_reviews`, `movie_reviews_rating`), a text-generation task (`gsm8k`, `bbc_headlines`,
    `cnn_dailymail`), or `custom` for local files: classification with `text_columns`, text generation
    with `format` (prompt_response, instruction or chat).
    """

    task: str
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    # classification
    text_columns: list[str] | None = None
    label_column: str = "label"
    problem: Literal["classification", "regression"] | None = None
    label_names: list[str] | None = None
    # text generation
    format: Literal["prompt_response", "instruction", "chat"] | None = None
    source_column: str | None = None
    target_column: str | None = None
    prompt_template: str | None = None
    chat_template: bool = False
    train_on_prompt: bool = False
    truncation: bool = True
    metric: Literal["rouge", "exact_match", "gsm8k", "number"] | None = None
    answer_column: str | None = None  # the column holding the reference the metric reads (default: the response)
    # both
    max_train_samples: int | None = Field(default=None, gt=0)
    max_eval_samples: int | None = Field(default=None, gt=0)
    seed: int | None = None  # draws the max_*_samples subsets; default: the run's seed
    eval_splits: list[str] | None = None  # evaluate on these of the task's eval splits only (the first picks best)

    @model_validator(mode="after")
    def _custom_needs_files(self) -> DataConfig:
        if self.task == "custom" and self.train_file is None:
            raise ValueError("task 'custom' needs train_file")
        if self.task == "custom" and self.format is None and not self.text_columns:
            raise ValueError("task 'custom' needs text_columns (classification) or format (text generation)")
        return self


class FsdpConfig(_Section):
    """Sharded training (PyTorch FSDP2) under `torchrun` or `accelerate launch`: each decoder block's base weights
    are split across the processes and gathered only while the block runs. `reshard_after_forward` frees a
    block's gathered weights after its forward pass (less memory, one more gather in the backward pass);
    `cpu_offload` keeps the sharded base weights in CPU memory between uses (CUDA only)."""

    reshard_after_forward: bool = True
    cpu_offload: bool = False


class TrainingConfig(_Section):
    """Optimisation: AdamW with linear warmup and decay, as in LoRA."""

    epochs: float = Field(default=3, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=32, gt=0)
    eval_batch_size: int = Field(default=64, gt=0)
    gradient_accumulation: int = Field(default=1, gt=0)
    lr: float = Field(default=1e-3, gt=0)
    head_lr: float | None = Field(default=None, gt=0)
    warmup_ratio: float = Field(default=0.06, ge=0, le=1)
    weight_decay: float = Field(default=0.01, ge=0)
    max_length: int = Field(default=256, gt=0)
    max_source_length: int | None = Field(default=None, gt=0)
    max_target_length: int | None = Field(default=None, gt=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    gradient_checkpointing: bool = False
    group_by_length: bool = False
    packing: bool = False
    eval_on_start: bool = False
    eval_every: int | None = Field(default=None, gt=0)
    save_every: int | None = Field(default=None, gt=0)
    log_every: int = Field(default=10, gt=0)
    # a run whose steps are non-finite this many times in a row has diverged: it stops (None: never)
    max_nonfinite_steps: int | None = Field(default=5, gt=0)
    fsdp: FsdpConfig | None = None  # None: every process holds the whole base (DDP)

    @field_validator("fsdp", mode="before")
    @classmethod
    def _fsdp_switch(cls, value: Any) -> Any:
        """`fsdp: true` is FSDP with the defaults, `fsdp: false` none at all."""
        if isinstance(value, bool):
            return {} if value else None
        return value


class EvalConfig(_Section):
    """How a split is scored. Generation (text tasks) is greedy unless `num_beams` > 1, never sampled, and
    always runs its prompts longest first. `sort_by_length` does the same for the scoring passes (a
    classifier's logits, a text task's loss): far less padding, but each row's numbers then differ from
    split-order scoring by float rounding (training is untouched), so it is off by default and a recipe's
    metrics stay exactly what they were."""

    sort_by_length: bool = False
    max_new_tokens: int = Field(default=128, gt=0)
    num_beams: int = Field(default=1, gt=0)
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = Field(default=0, ge=0)


Tracker = Literal["tensorboard", "wandb", "mlflow", "trackio"]


class LoggingConfig(_Section):
    """Where metrics go besides `metrics.jsonl`: `report_to` names experiment trackers (TensorBoard event files in
    `<output_dir>/tensorboard/`, Weights & Biases, MLflow, trackio), each an optional extra
    (`pip install 'aflora[wandb]'`, ...); `tensorboard: true` is the same as listing `tensorboard`. `project` is
    the W&B project, MLflow experiment and trackio project; `run_name` the run's name (default: the name of
    `output_dir`)."""

    tensorboard: bool = False
    report_to: list[Tracker] = Field(default_factory=list)
    project: str = Field(default="aflora", min_length=1)
    run_name: str | None = None

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        """`report_to: wandb` is a list of one; `none` (or null) is none at all."""
        if value is None or value == "none":
            return []
        return [value] if isinstance(value, str) else value

    def trackers(self) -> list[str]:
        """The trackers asked for, each once, TensorBoard's own key included."""
        names = (["tensorboard"] if self.tensorboard else []) + list(self.report_to)
        return list(dict.fromkeys(names))


class Recipe(_Section):
    """A whole recipe; every key has one meaning and one place."""

    output_dir: str
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    model: ModelConfig
    data: DataConfig
    adapter: AdapterConfig = AdapterConfig()
    freezing: FreezingConfig = FreezingConfig()
    training: TrainingConfig = TrainingConfig()
    eval: EvalConfig = EvalConfig()
    logging: LoggingConfig = LoggingConfig()


def differing_key(old: Any, new: Any, prefix: str = "") -> str | None:
    """The first dotted key where two nested dicts (dumped recipes or sections) differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = differing_key(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return prefix.rstrip(".") if old != new else None


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override to a raw recipe dict; the value is parsed as YAML."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise AfloraError(f"--set {assignment!r}: expected KEY=VALUE, e.g. training.max_steps=40")
    set_dotted(raw, key.strip(), yaml.safe_load(text) if text.strip() else None, f"--set {assignment!r}")


def set_dotted(raw: dict[str, Any], dotted: str, value: Any, where: str) -> None:
    """Set `a.b.c` of a raw recipe dict to `value`, making the sections on the way; `where` names the setting in
    the one-line error when a section on the way holds a value."""
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise AfloraError(f"{where}: {part!r} is not a section")
        node = child
    node[leaf] = value


def parse_recipe(raw: Any, source: str) -> Recipe:
    """Validate a raw mapping into a Recipe; any problem becomes one line naming the source and key."""
    if not isinstance(raw, dict):
        raise AfloraError(f"{source}: expected a mapping of recipe sections at the top level")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "(top level)"
        problem = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        value = first.get("input")
        shown = (
            "" if first["type"] in ("extra_forbidden", "missing") or isinstance(value, dict) else f" (got {value!r})"
        )
        more = f" and {err.error_count() - 1} more problem(s)" if err.error_count() > 1 else ""
        raise AfloraError(f"{source}: {key}: {problem}{shown}{more}") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply `--set` overrides and validate it."""
    path = Path(path)
    if not path.is_file():
        raise AfloraError(f"{path}: recipe not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(err, "problem", None) or "not valid YAML"
        raise AfloraError(f"{path}: invalid YAML{where}: {reason}") from None
    except UnicodeDecodeError:
        raise AfloraError(f"{path}: not a UTF-8 text file") from None
    raw = raw if raw is not None else {}
    for assignment in overrides or []:
        if not isinstance(raw, dict):
            break
        apply_override(raw, assignment)
    recipe = parse_recipe(raw, str(path))
    _resolve_local_paths(recipe, path.parent)
    return recipe


def _resolve_local_paths(recipe: Recipe, base: Path) -> None:
    """Relative data files and model directories are taken relative to the recipe's own folder."""
    for key in ("train_file", "validation_file", "test_file"):
        value = getattr(recipe.data, key)
        if value is not None and not Path(value).is_absolute():
            setattr(recipe.data, key, str((base / value).resolve()))
    name = recipe.model.name_or_path
    local = name.startswith(".") or (name.endswith(".gguf") and not name.startswith("package:"))
    if local and not Path(name).is_absolute():
        recipe.model.name_or_path = str((base / name).resolve())


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain data, for saving beside a checkpoint."""
    return recipe.model_dump(mode="json")
