"""Sequence classification and regression: GLUE, the shipped movie reviews, or local files with labels.

A task is one of the eight GLUE tasks (read from the Hugging Face Hub), the shipped `movie_reviews` set
(binary sentiment) or `movie_reviews_rating` (the same sentences, regression on the human rating), or
`custom`: local csv, tsv, jsonl, json or parquet files described by the recipe's `data` section.

Every loaded split is a sequence of encoded rows (`TableRows`) with the columns a model takes (`input_ids`,
`attention_mask`, `token_type_ids` when the tokenizer makes them) and `labels` (int64 class ids or float32
targets). Texts are
truncated to `max_length` but not padded: `make_collator` pads each batch to its longest sequence. The
model is `AutoModelForSequenceClassification` with a new head, which trains beside the adapters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from aflora_cli.engine import base_model
from aflora_cli.engine.inject import unfreeze_head
from aflora_cli.engine.layer import fixed_adapters
from aflora_cli.engine.storage import BaseStorage
from aflora_cli.errors import AfloraError
from aflora_cli.recipe import DataConfig, Recipe
from aflora_cli.tasks import Prediction, Progress, Row, Task, TaskData
from aflora_cli.tasks.classification_metrics import compute_metrics
from aflora_cli.tasks.tables import (
    SHIPPED_DIR,
    Columns,
    TableRows,
    choose_splits,
    load_hub_dataset,
    read_table,
    require_columns,
    require_rows,
    subset_rows,
    texts,
)

Problem = Literal["classification", "regression"]
GLUE_HUB_ID = "nyu-mll/glue"
LABELS = "labels"


@dataclass(frozen=True)
class TaskSpec:
    """What a task predicts and how it is scored.

    `eval_splits` maps our split name to the split's name in the source (a hub split, a shipped file's stem,
    or the recipe key of a custom file). The first eval split picks the best checkpoint by `main_metric`;
    any others (MNLI's mismatched set, a labelled test set) are reported beside it.
    """

    name: str
    text_columns: tuple[str, ...]
    label_column: str
    problem: Problem
    num_labels: int
    label_names: tuple[str, ...] | None
    metrics: tuple[str, ...]
    main_metric: str
    eval_splits: Mapping[str, str]

    def to_dict(self) -> dict[str, Any]:
        """Plain data, e.g. to save as JSON beside a checkpoint."""
        return asdict(self) | {"eval_splits": dict(self.eval_splits)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskSpec:
        """The inverse of `to_dict`: lists read back from JSON become tuples again."""
        fields = {key: value for key, value in data.items() if key != "family"}
        for key in ("text_columns", "metrics", "label_names"):
            if fields[key] is not None:
                fields[key] = tuple(fields[key])
        fields["eval_splits"] = dict(fields["eval_splits"])
        return cls(**fields)


@dataclass
class LabelledData:
    """A classification task's tokenized splits: `train` (None when not asked for) and the eval splits."""

    spec: TaskSpec
    train: TableRows | None
    evaluation: dict[str, TableRows]


def _classification(
    name: str,
    text_columns: tuple[str, ...],
    label_names: tuple[str, ...],
    metrics: tuple[str, ...] = ("accuracy",),
    eval_splits: Mapping[str, str] | None = None,
) -> TaskSpec:
    """A classification task on column `label`; its first metric is the main one."""
    return TaskSpec(
        name,
        text_columns,
        "label",
        "classification",
        len(label_names),
        label_names,
        metrics,
        metrics[0],
        eval_splits or {"validation": "validation"},
    )


def _regression(
    name: str, text_columns: tuple[str, ...], label_column: str, eval_splits: Mapping[str, str]
) -> TaskSpec:
    """A regression task scored by Pearson (main) and Spearman correlation."""
    return TaskSpec(
        name, text_columns, label_column, "regression", 1, None, ("pearson", "spearman"), "pearson", eval_splits
    )


_PAIR = ("sentence1", "sentence2")
_NLI = ("entailment", "not_entailment")
_SHIPPED_SPLITS = {"validation": "validation", "test": "test"}

GLUE_TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _classification("cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",)),
        _classification("sst2", ("sentence",), ("negative", "positive")),
        _classification("mrpc", _PAIR, ("not_equivalent", "equivalent"), ("accuracy", "f1")),
        _classification("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1")),
        _regression("stsb", _PAIR, "label", {"validation": "validation"}),
        _classification(
            "mnli",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            eval_splits={"validation_matched": "validation_matched", "validation_mismatched": "validation_mismatched"},
        ),
        _classification("qnli", ("question", "sentence"), _NLI),
        _classification("rte", _PAIR, _NLI),
    )
}

SHIPPED_TASKS: dict[str, TaskSpec] = {
    "movie_reviews": _classification(
        "movie_reviews", ("sentence",), ("negative", "positive"), eval_splits=_SHIPPED_SPLITS
    ),
    "movie_reviews_rating": _regression("movie_reviews_rating", ("sentence",), "rating", _SHIPPED_SPLITS),
}
_SHIPPED_FOLDER = {"movie_reviews": "movie_reviews", "movie_reviews_rating": "movie_reviews"}

KNOWN_TASKS: tuple[str, ...] = (*GLUE_TASKS, *SHIPPED_TASKS, "custom")
_CUSTOM_ONLY_KEYS = ("train_file", "validation_file", "test_file", "text_columns", "problem", "label_names")
_TEXT_ONLY_KEYS = (
    "format",
    "source_column",
    "target_column",
    "prompt_template",
    "chat_template",
    "train_on_prompt",
    "truncation",
    "metric",
    "answer_column",
)
_CUSTOM_FILE_KEYS = {"train": "train_file", "validation": "validation_file", "test": "test_file"}


def _as_index(value: Any) -> int | None:
    """A whole number given as int, float or text (`1`, `1.0`, `"1"`); None for anything else."""
    number = _as_number(value)
    return int(number) if number is not None and number.is_integer() else None


def _class_ids(values: list[Any], spec: TaskSpec, source: str) -> list[int]:
    """Class ids; a value equal (as text) to a label name takes its index, else a whole number 0..k-1 is the id."""
    index = {name: i for i, name in enumerate(spec.label_names or ())}
    ids = []
    for number, value in enumerate(values, start=1):
        class_id = index.get(str(value)) if value is not None else None
        if class_id is None:
            class_id = _as_index(value)
        if class_id is None or not 0 <= class_id < spec.num_labels:
            raise AfloraError(
                f"{source}: row {number}: label {value!r} in column {spec.label_column!r} "
                f"is not one of {_allowed_labels(spec)}"
            )
        ids.append(class_id)
    return ids


def _allowed_labels(spec: TaskSpec) -> str:
    """The label values a classification task accepts, for messages."""
    ids = f"0..{spec.num_labels - 1}"
    return f"{', '.join(spec.label_names)} (or {ids})" if spec.label_names else ids


def _targets(values: list[Any], column: str, source: str) -> list[float]:
    """Regression targets: finite numbers."""
    targets = []
    for number, value in enumerate(values, start=1):
        target = _as_number(value)
        if target is None or not math.isfinite(target):
            raise AfloraError(f"{source}: row {number}: label {value!r} in column {column!r} is not a finite number")
        targets.append(target)
    return targets


def _as_number(value: Any) -> float | None:
    """A number given as int, float or text; None for anything else."""
    if isinstance(value, (int, float, str)):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _labelled_columns(spec: TaskSpec, columns: Columns, source: str) -> Columns:
    """The spec's text columns and converted `labels`."""
    require_rows(columns, source)
    require_columns(columns, [*spec.text_columns, spec.label_column], source)
    data: dict[str, list[Any]] = {name: texts(columns, name, source) for name in spec.text_columns}
    values = columns[spec.label_column]
    if spec.problem == "classification":
        data[LABELS] = _class_ids(values, spec, source)
    else:
        data[LABELS] = _targets(values, spec.label_column, source)
    return data


# ------------------------------------------------------------------------------------------------------ tasks


def resolve_spec(cfg: DataConfig) -> TaskSpec:
    """The task a recipe's data section names; for `custom` this reads the train file to learn the labels."""
    spec = _named_or_custom_spec(cfg)
    return replace(spec, eval_splits=choose_splits(dict(spec.eval_splits), cfg.eval_splits, spec.name))


def _named_or_custom_spec(cfg: DataConfig) -> TaskSpec:
    _refuse_text_keys(cfg)
    if cfg.task == "custom":
        return _custom_spec(cfg)
    spec = GLUE_TASKS.get(cfg.task) or SHIPPED_TASKS.get(cfg.task)
    if spec is None:
        from aflora_cli.tasks.text_data import NAMED_TASKS

        known = ", ".join((*KNOWN_TASKS, *NAMED_TASKS))
        raise AfloraError(f"data.task: unknown task {cfg.task!r}; known tasks: {known}")
    for key in _CUSTOM_ONLY_KEYS:
        if getattr(cfg, key) is not None:
            raise AfloraError(f"data.{key}: only used with task 'custom' (the task is {cfg.task!r})")
    if cfg.label_column != "label":
        raise AfloraError(f"data.label_column: only used with task 'custom' (the task is {cfg.task!r})")
    return spec


def _refuse_text_keys(cfg: DataConfig) -> None:
    """Keys of text-generation tasks mean nothing here: say so rather than ignore them."""
    for key in _TEXT_ONLY_KEYS:
        if getattr(cfg, key) != DataConfig.model_fields[key].default:
            raise AfloraError(
                f"data.{key}: only used with text-generation tasks (the task {cfg.task!r} is classification)"
            )


def _custom_spec(cfg: DataConfig) -> TaskSpec:
    """A custom task's spec: the problem and label set come from the recipe, or else from the train labels.

    Without `problem`, labels that are all numbers with some not whole mean regression, unless `label_names`
    is given; anything else is classification. Without `label_names`, whole-number labels are class ids
    0..max; text labels are the sorted distinct train values.
    """
    if cfg.train_file is None:
        raise AfloraError("data.train_file: task 'custom' needs a train file")
    text_columns = tuple(cfg.text_columns or ())
    if len(text_columns) not in (1, 2):
        raise AfloraError(f"data.text_columns: expected 1 or 2 column names, got {len(text_columns)}")
    columns = read_table(cfg.train_file)
    require_rows(columns, cfg.train_file)
    require_columns(columns, [cfg.label_column], cfg.train_file)
    values = columns[cfg.label_column]
    guessed: Problem = "classification" if cfg.label_names else _guess_problem(values)
    problem = cfg.problem or guessed
    eval_splits = {split: split for split, key in _CUSTOM_FILE_KEYS.items() if split != "train" and getattr(cfg, key)}
    if problem == "regression":
        if cfg.label_names is not None:
            raise AfloraError("data.label_names: only used for classification, but data.problem is 'regression'")
        return _regression("custom", text_columns, cfg.label_column, eval_splits)
    label_names: tuple[str, ...] | None
    if cfg.label_names:
        num_labels, label_names = len(cfg.label_names), tuple(cfg.label_names)
    else:
        num_labels, label_names = _guess_classes(values)
    if num_labels < 2:
        raise AfloraError(
            f"{cfg.train_file}: column {cfg.label_column!r}: classification needs at least two "
            f"classes, found {num_labels}"
        )
    metrics = ("accuracy", "f1") if num_labels == 2 else ("accuracy",)
    return TaskSpec(
        "custom",
        text_columns,
        cfg.label_column,
        "classification",
        num_labels,
        label_names,
        metrics,
        "accuracy",
        eval_splits,
    )


def _guess_problem(values: list[Any]) -> Problem:
    """Regression when every label is a number and some are not whole; classification otherwise."""
    numbers = [_as_number(value) for value in values]
    if all(n is not None for n in numbers) and any(_as_index(value) is None for value in values):
        return "regression"
    return "classification"


def _guess_classes(values: list[Any]) -> tuple[int, tuple[str, ...] | None]:
    """(num_labels, label_names): whole numbers >= 0 are class ids 0..max, unnamed; else sorted distinct texts."""
    ids = [index for value in values if (index := _as_index(value)) is not None and index >= 0]
    if len(ids) == len(values):
        return max(ids) + 1, None
    names = tuple(sorted({str(value) for value in values if value is not None}))
    return len(names), names


# ---------------------------------------------------------------------------------------------------- loading


def load_task_data(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    seed: int,
    splits: Sequence[str] | None = None,
) -> LabelledData:
    """Load and tokenize a task's splits: `splits` names ours ("train", then the spec's eval splits); None means all.

    `max_train_samples` / `max_eval_samples` keep a random subset of that many rows drawn with `seed`,
    in their original order; the same seed always gives the same rows.
    """
    spec = resolve_spec(cfg)
    wanted = _check_splits(spec, splits)
    raw = _raw_splits(spec, cfg, wanted)
    encoded = {}
    for split, dataset in raw.items():
        limit = cfg.max_train_samples if split == "train" else cfg.max_eval_samples
        encoded[split] = _tokenize(_subset(dataset, limit, seed), spec, tokenizer, max_length)
    train = encoded.pop("train", None)
    return LabelledData(spec, train, encoded)


def load_eval_file(
    spec: TaskSpec,
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_samples: int | None = None,
    seed: int = 0,
) -> TableRows:
    """A local file as an eval split of an existing task: it needs the spec's text and label columns."""
    columns = _labelled_columns(spec, read_table(path), str(path))
    return _tokenize(_subset(columns, max_samples, seed), spec, tokenizer, max_length)


def make_collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorWithPadding:
    """Pads each batch to its longest sequence and returns torch tensors (`labels` as int64 or float32)."""
    if tokenizer.pad_token is None:
        raise AfloraError(f"tokenizer {tokenizer.name_or_path!r} has no padding token, so batches cannot be padded")
    return DataCollatorWithPadding(tokenizer=tokenizer)


def _check_splits(spec: TaskSpec, splits: Sequence[str] | None) -> list[str]:
    """The split names to load, in order; unknown names are an error."""
    available = ["train", *spec.eval_splits]
    for split in splits or ():
        if split not in available:
            raise AfloraError(f"split {split!r}: not a split of task {spec.name!r}; available: {', '.join(available)}")
    return list(splits) if splits is not None else available


def _raw_splits(spec: TaskSpec, cfg: DataConfig, splits: list[str]) -> dict[str, Columns]:
    """Untokenized splits: the spec's text columns and `labels`."""
    source_names = {"train": "train", **spec.eval_splits}
    if spec.name in GLUE_TASKS:
        hub = load_hub_dataset(GLUE_HUB_ID, spec.name, spec.name)
        return {split: _hub_split(spec, hub[source_names[split]]) for split in splits}
    if spec.name in SHIPPED_TASKS:
        folder = SHIPPED_DIR / _SHIPPED_FOLDER[spec.name]
        paths = {split: folder / f"{source_names[split]}.tsv" for split in splits}
    else:
        paths = {split: Path(getattr(cfg, _CUSTOM_FILE_KEYS[split])) for split in splits}
    return {split: _labelled_columns(spec, read_table(path), str(path)) for split, path in paths.items()}


def _hub_split(spec: TaskSpec, dataset: Any) -> Columns:
    """A hub split (a `datasets.Dataset`) as the text columns and `labels`."""
    columns: Columns = dataset.select_columns([*spec.text_columns, spec.label_column]).to_dict()
    columns[LABELS] = columns.pop(spec.label_column)
    return columns


def _subset(columns: Columns, limit: int | None, seed: int) -> Columns:
    """`limit` rows drawn at random with `seed`, kept in their original order; all rows when limit is None."""
    rows = subset_rows(len(columns[LABELS]), limit, seed)
    return columns if rows is None else {name: [values[i] for i in rows] for name, values in columns.items()}


def _tokenize(columns: Columns, spec: TaskSpec, tokenizer: PreTrainedTokenizerBase, max_length: int) -> TableRows:
    """Tokenize in one call, truncating to `max_length` without padding; labels become int64 or float32."""
    encoded: dict[str, Any] = dict(
        tokenizer(*(columns[name] for name in spec.text_columns), truncation=True, max_length=max_length)
    )
    encoded[LABELS] = np.array(columns[LABELS], dtype=np.int64 if spec.problem == "classification" else np.float32)
    return TableRows(encoded)


# ------------------------------------------------------------------------------------------------ the model


def load_classifier(
    model_dir: Path,
    num_labels: int,
    problem: str,
    label_names: Sequence[str] | None,
    pad_token_id: int | None,
    storage: BaseStorage | None = None,
    device: torch.device | None = None,
) -> nn.Module:
    """The base model with a new sequence-classification (or regression) head."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    stored = storage or BaseStorage()

    def load() -> nn.Module:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=stored.trust_remote_code)
        config.num_labels = num_labels
        config.problem_type = "regression" if problem == "regression" else "single_label_classification"
        if label_names:
            config.id2label = dict(enumerate(label_names))
            config.label2id = {name: i for i, name in enumerate(label_names)}
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = pad_token_id
        model: nn.Module = stored.from_pretrained(AutoModelForSequenceClassification, model_dir, device, config=config)
        return model

    return base_model.load_or_fail(load, model_dir)


# ------------------------------------------------------------------------------------------------ scoring


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: Sequence[Row],
    tokenizer: PreTrainedTokenizerBase,
    batches: Sequence[Sequence[int]],
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels for every row of `dataset`, in the dataset's order, scored in `batches` of row
    indices (together every index once)."""
    was_training = model.training
    model.eval()
    # a DataLoader, not a plain loop: its iterator draws a seed from the global RNG, and later training steps'
    # dropout masks depend on that draw, so a run's weights stay what they have always been
    loader: DataLoader[Any] = DataLoader(dataset, batch_sampler=batches, collate_fn=make_collator(tokenizer))  # type: ignore[arg-type]
    logits, labels = [], []
    with fixed_adapters(model):  # an encoder's adapted weights, merged once for the whole split
        for batch in loader:
            batch = {key: value.to(device) for key, value in batch.items()}
            out = model(**{key: value for key, value in batch.items() if key != "labels"})
            logits.append(out.logits.float().cpu())
            labels.append(batch["labels"].cpu())
    model.train(was_training)
    in_order = torch.argsort(torch.as_tensor([i for indices in batches for i in indices], dtype=torch.long))
    return torch.cat(logits)[in_order].numpy(), torch.cat(labels)[in_order].numpy()


# ------------------------------------------------------------------------------------------------ the family


class ClassificationTask(Task):
    """Sequence classification or regression with a new head (`AutoModelForSequenceClassification`)."""

    family = "classification"
    auto_class = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"

    def __init__(self, recipe: Recipe, spec: TaskSpec) -> None:
        super().__init__(recipe)
        self.spec = spec

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> ClassificationTask:
        return cls(recipe, resolve_spec(recipe.data))

    @classmethod
    def from_manifest(cls, entry: dict[str, Any], recipe: Recipe) -> ClassificationTask:
        return cls(recipe, TaskSpec.from_dict(entry))

    @property
    def main_metric(self) -> str:
        return self.spec.main_metric

    def describe(self) -> dict[str, Any]:
        return {"family": self.family, **self.spec.to_dict()}

    def load_model(
        self,
        model_dir: Path,
        tokenizer: PreTrainedTokenizerBase,
        storage: BaseStorage | None = None,
        device: torch.device | None = None,
    ) -> nn.Module:
        spec = self.spec
        return load_classifier(
            model_dir, spec.num_labels, spec.problem, spec.label_names, tokenizer.pad_token_id, storage, device
        )

    def train_head(self, model: nn.Module) -> list[str]:
        return unfreeze_head(model)

    def load_splits(self, tokenizer: PreTrainedTokenizerBase, splits: Sequence[str] | None = None) -> TaskData:
        recipe = self.recipe
        if self.spec.name == "custom" and splits is not None and "train" not in splits:
            # the spec is known (from a manifest): read only the wanted files, not the train file
            cfg, max_length = recipe.data, recipe.training.max_length
            files = {split: getattr(cfg, _CUSTOM_FILE_KEYS[split]) for split in _check_splits(self.spec, splits)}
            evaluation = {
                split: load_eval_file(self.spec, file, tokenizer, max_length, cfg.max_eval_samples, self.data_seed)
                for split, file in files.items()
            }
            return TaskData(None, evaluation)
        data = load_task_data(recipe.data, tokenizer, recipe.training.max_length, self.data_seed, splits)
        return TaskData(data.train, dict(data.evaluation))

    def load_file(self, path: str | Path, tokenizer: PreTrainedTokenizerBase) -> Sequence[Row]:
        return load_eval_file(self.spec, path, tokenizer, self.recipe.training.max_length)

    def collate(self, tokenizer: PreTrainedTokenizerBase) -> Callable[[list[Row]], dict[str, torch.Tensor]]:
        return make_collator(tokenizer)

    def evaluate(
        self,
        model: nn.Module,
        rows: Sequence[Row],
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
        progress: Progress | None = None,
    ) -> tuple[dict[str, float], list[Prediction]]:
        logits, labels = predict(model, rows, tokenizer, self.scoring_batches(rows), device)
        metrics = compute_metrics(self.spec, logits, labels)
        if progress is not None:
            progress(len(labels), len(labels))
        return metrics, self._predictions(rows, logits, labels, tokenizer)

    def _predictions(
        self, rows: Sequence[Row], logits: np.ndarray, labels: np.ndarray, tokenizer: PreTrainedTokenizerBase
    ) -> list[Prediction]:
        """Per row: the input as the model saw it (decoded tokens), the predicted and the true label."""
        spec, out = self.spec, []
        for row, row_logits, label in zip(rows, logits, labels, strict=True):
            text = str(tokenizer.decode(row["input_ids"], skip_special_tokens=True))
            if spec.problem == "regression":
                value = float(row_logits.reshape(-1)[0])
                out.append(Prediction(text, f"{value:g}", value, float(label), None))
                continue
            predicted, truth = int(row_logits.argmax()), int(label)
            names = spec.label_names
            shown: str | int = names[predicted] if names else predicted
            out.append(Prediction(text, str(shown), shown, names[truth] if names else truth, predicted == truth))
        return out
