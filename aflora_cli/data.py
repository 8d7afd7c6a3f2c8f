"""Tasks and their data: what to predict from which text columns, how it is scored, and loading it tokenized.

A task is one of the eight GLUE tasks (read from the Hugging Face Hub), the shipped `movie_reviews` set
(binary sentiment) or `movie_reviews_rating` (the same sentences, regression on the human rating), or
`custom`: local csv, tsv, jsonl, json or parquet files described by the recipe's `data` section.

Every loaded split is a `datasets.Dataset` with the columns a model takes (`input_ids`, `attention_mask`,
`token_type_ids` when the tokenizer makes them) and `labels` (int64 class ids or float32 targets). Texts are
truncated to `max_length` but not padded: `make_collator` pads each batch to its longest sequence.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow
import pyarrow.parquet
from datasets import Dataset, DatasetDict, Value, load_dataset
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from aflora_cli.errors import AfloraError
from aflora_cli.recipe import DataConfig

Problem = Literal["classification", "regression"]
Columns = dict[str, list[Any]]

GLUE_HUB_ID = "nyu-mll/glue"
SHIPPED_DIR = Path(__file__).resolve().parent / "datasets"
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
        fields = dict(data)
        for key in ("text_columns", "metrics", "label_names"):
            if fields[key] is not None:
                fields[key] = tuple(fields[key])
        fields["eval_splits"] = dict(fields["eval_splits"])
        return cls(**fields)


@dataclass
class TaskData:
    """A task's tokenized splits: `train` (None when not asked for) and the eval splits by our split name."""

    spec: TaskSpec
    train: Dataset | None
    evaluation: dict[str, Dataset]


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
_CUSTOM_FILE_KEYS = {"train": "train_file", "validation": "validation_file", "test": "test_file"}


# ---------------------------------------------------------------------------------------------- reading files


def read_table(path: str | Path) -> Columns:
    """Read a local csv, tsv, jsonl, json (a list of objects) or parquet file into columns by name.

    csv and tsv files need a header line and follow the usual quoting (a field in double quotes may hold the
    delimiter, line breaks and doubled quotes); every value is read as text.
    """
    path = Path(path)
    if not path.is_file():
        raise AfloraError(f"{path}: file not found")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise AfloraError(f"{path}: unsupported file type {path.suffix!r}; expected one of {', '.join(_READERS)}")
    try:
        return reader(path)
    except UnicodeDecodeError:
        raise AfloraError(f"{path}: not a UTF-8 text file") from None


def _read_delimited(path: Path, delimiter: str) -> Columns:
    """A csv or tsv file with a header line; every row must have as many fields as the header."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            rows = csv.reader(handle, delimiter=delimiter)
            header = next(rows, None)
            if header is None:
                raise AfloraError(f"{path}: empty file, expected a header line naming the columns")
            if len(set(header)) != len(header):
                raise AfloraError(f"{path}: repeated column names in the header: {', '.join(header)}")
            columns: Columns = {name: [] for name in header}
            for number, row in enumerate((row for row in rows if row), start=1):
                if len(row) != len(header):
                    raise AfloraError(f"{path}: row {number} has {len(row)} fields, the header has {len(header)}")
                for name, value in zip(header, row, strict=True):
                    columns[name].append(value)
    except csv.Error as err:
        raise AfloraError(f"{path}: not a valid {path.suffix[1:]} file: {err}") from None
    return columns


def _read_jsonl(path: Path) -> Columns:
    """One JSON object per line; blank lines are skipped."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise AfloraError(f"{path}: line {number}: invalid JSON ({err.msg})") from None
    return _records_to_columns(records, path)


def _read_json(path: Path) -> Columns:
    """A JSON document holding a list of objects."""
    try:
        records = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise AfloraError(
            f"{path}: invalid JSON ({err.msg} at line {err.lineno}); expected a list of objects "
            "(name the file .jsonl for one object per line)"
        ) from None
    if not isinstance(records, list):
        raise AfloraError(f"{path}: expected a JSON list of objects, got a {type(records).__name__}")
    return _records_to_columns(records, path)


def _records_to_columns(records: list[Any], path: Path) -> Columns:
    """Objects to columns; a key missing from some objects gives None there."""
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise AfloraError(f"{path}: row {number} is a {type(record).__name__}, expected a JSON object")
    names = list(dict.fromkeys(key for record in records for key in record))
    return {name: [record.get(name) for record in records] for name in names}


def _read_parquet(path: Path) -> Columns:
    """A parquet table, values as Python objects."""
    try:
        return pyarrow.parquet.read_table(path).to_pydict()
    except pyarrow.ArrowException as err:
        raise AfloraError(f"{path}: not a readable parquet file ({err})") from None


_READERS: dict[str, Callable[[Path], Columns]] = {
    ".csv": lambda path: _read_delimited(path, ","),
    ".tsv": lambda path: _read_delimited(path, "\t"),
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".parquet": _read_parquet,
}


# ------------------------------------------------------------------------------------- columns to labelled rows


def _require_rows(columns: Columns, source: str) -> None:
    """A split needs at least one row."""
    if not any(columns.values()):
        raise AfloraError(f"{source}: no data rows")


def _require_columns(columns: Columns, names: Sequence[str], source: str) -> None:
    """Each wanted column must be in the file."""
    for name in names:
        if name not in columns:
            present = ", ".join(columns) or "none"
            raise AfloraError(f"{source}: missing column {name!r} (columns present: {present})")


def _texts(columns: Columns, name: str, source: str) -> list[str]:
    """A text column; every value must be a string."""
    values = columns[name]
    for number, value in enumerate(values, start=1):
        if not isinstance(value, str):
            shown = "no value" if value is None else f"{value!r} ({type(value).__name__})"
            raise AfloraError(f"{source}: row {number}: column {name!r} has {shown}, expected text")
    return values


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


def _labelled_dataset(spec: TaskSpec, columns: Columns, source: str) -> Dataset:
    """An in-memory dataset of the spec's text columns and converted `labels`."""
    _require_rows(columns, source)
    _require_columns(columns, [*spec.text_columns, spec.label_column], source)
    data: dict[str, list[Any]] = {name: _texts(columns, name, source) for name in spec.text_columns}
    values = columns[spec.label_column]
    if spec.problem == "classification":
        data[LABELS] = _class_ids(values, spec, source)
    else:
        data[LABELS] = _targets(values, spec.label_column, source)
    return Dataset.from_dict(data)


# ------------------------------------------------------------------------------------------------------ tasks


def resolve_task(cfg: DataConfig) -> TaskSpec:
    """The task a recipe's data section names; for `custom` this reads the train file to learn the labels."""
    if cfg.task == "custom":
        return _custom_spec(cfg)
    spec = GLUE_TASKS.get(cfg.task) or SHIPPED_TASKS.get(cfg.task)
    if spec is None:
        raise AfloraError(f"data.task: unknown task {cfg.task!r}; known tasks: {', '.join(KNOWN_TASKS)}")
    for key in _CUSTOM_ONLY_KEYS:
        if getattr(cfg, key) is not None:
            raise AfloraError(f"data.{key}: only used with task 'custom' (the task is {cfg.task!r})")
    if cfg.label_column != "label":
        raise AfloraError(f"data.label_column: only used with task 'custom' (the task is {cfg.task!r})")
    return spec


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
    _require_rows(columns, cfg.train_file)
    _require_columns(columns, [cfg.label_column], cfg.train_file)
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
) -> TaskData:
    """Load and tokenize a task's splits: `splits` names ours ("train", then the spec's eval splits); None means all.

    `max_train_samples` / `max_eval_samples` keep a random subset of that many rows drawn with `seed`,
    in their original order; the same seed always gives the same rows.
    """
    spec = resolve_task(cfg)
    wanted = _check_splits(spec, splits)
    raw = _raw_splits(spec, cfg, wanted)
    encoded = {}
    for split, dataset in raw.items():
        limit = cfg.max_train_samples if split == "train" else cfg.max_eval_samples
        encoded[split] = _tokenize(_subset(dataset, limit, seed), spec, tokenizer, max_length)
    train = encoded.pop("train", None)
    return TaskData(spec, train, encoded)


def load_eval_file(
    spec: TaskSpec,
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_samples: int | None = None,
    seed: int = 0,
) -> Dataset:
    """A local file as an eval split of an existing task: it needs the spec's text and label columns."""
    dataset = _labelled_dataset(spec, read_table(path), str(path))
    return _tokenize(_subset(dataset, max_samples, seed), spec, tokenizer, max_length)


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


def _raw_splits(spec: TaskSpec, cfg: DataConfig, splits: list[str]) -> dict[str, Dataset]:
    """Untokenized splits with the spec's text columns and `labels`."""
    source_names = {"train": "train", **spec.eval_splits}
    if spec.name in GLUE_TASKS:
        hub = _load_glue(spec.name)
        return {split: _hub_split(spec, hub[source_names[split]]) for split in splits}
    if spec.name in SHIPPED_TASKS:
        folder = SHIPPED_DIR / _SHIPPED_FOLDER[spec.name]
        paths = {split: folder / f"{source_names[split]}.tsv" for split in splits}
    else:
        paths = {split: Path(getattr(cfg, _CUSTOM_FILE_KEYS[split])) for split in splits}
    return {split: _labelled_dataset(spec, read_table(path), str(path)) for split, path in paths.items()}


def _load_glue(config: str) -> DatasetDict:
    """A GLUE task from the Hugging Face Hub (or the local datasets cache)."""
    try:
        return load_dataset(GLUE_HUB_ID, config)
    except OSError as err:  # ConnectionError, offline mode and a missing dataset are all OSErrors
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise AfloraError(
            f"data.task {config!r}: could not load {GLUE_HUB_ID} ({config}) from the Hugging Face Hub ({reason}); "
            "connect to the network, or run with HF_DATASETS_OFFLINE=1 if it is already in the datasets cache, "
            "or use task 'custom' with local files"
        ) from None


def _hub_split(spec: TaskSpec, dataset: Dataset) -> Dataset:
    """A hub split cut down to the text columns and `labels` (metadata only, nothing is copied)."""
    return dataset.select_columns([*spec.text_columns, spec.label_column]).rename_column(spec.label_column, LABELS)


def _subset(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    """`limit` rows drawn at random with `seed`, kept in their original order; all rows when limit is None."""
    if limit is None or limit >= len(dataset):
        return dataset
    rows = np.sort(np.random.default_rng(seed).choice(len(dataset), size=limit, replace=False))
    return dataset.select(rows, keep_in_memory=True)


def _tokenize(dataset: Dataset, spec: TaskSpec, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    """Tokenize in batches, truncating to `max_length` without padding; labels become int64 or float32."""

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        return dict(tokenizer(*(batch[name] for name in spec.text_columns), truncation=True, max_length=max_length))

    encoded = dataset.map(encode, batched=True, remove_columns=list(spec.text_columns), keep_in_memory=True)
    return encoded.cast_column(LABELS, Value("int64" if spec.problem == "classification" else "float32"))
