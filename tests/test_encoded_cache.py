"""Fast data preparation: batched encoding gives the ids of one call per piece, local files stream in chunks,
and encoded splits are cached (Arrow, keyed on all that changes the tokens) and read back identical."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.ipc
import pytest
from text_runs import lm_recipe, review_rows, write_jsonl

from aflora_cli.errors import AfloraError
from aflora_cli.recipe import parse_recipe
from aflora_cli.tasks.causal_lm import CausalLMTask, chat_pieces
from aflora_cli.tasks.encoded_cache import CACHE_ENV, EncodedRows, cache_dir
from aflora_cli.tasks.generative import IGNORE
from aflora_cli.tasks.text_data import file_row_chunks, resolve_spec, rows_from_file
from tiny_lm import tiny_tokenizer


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    return folder


def task_for(files: dict[str, Path], **sections: Any) -> CausalLMTask:
    raw = lm_recipe(Path("/tmp/unused"), "llama", files, **sections)
    return CausalLMTask.from_recipe(parse_recipe(raw, "test"))


def as_lists(rows: Any) -> list[dict[str, Any]]:
    return [{key: value.tolist() if hasattr(value, "tolist") else value for key, value in row.items()} for row in rows]


@pytest.mark.parametrize("chat", [False, True])
def test_batched_encoding_gives_the_ids_of_one_call_per_piece(tmp_path: Path, chat: bool) -> None:
    """The ids `encode` produced before it was batched: each piece tokenized by its own call."""
    tokenizer = tiny_tokenizer()
    path = write_jsonl(tmp_path / "train.jsonl", review_rows("train", 8))  # prompts of 28 to 48 tokens
    limit = 62 if chat else 46  # some rows cut, one (or more) left out
    task = task_for({"train_file": path}, training={"max_length": limit}, data={"chat_template": chat})
    rows = rows_from_file(task.spec, path)
    encoded = task.encode_many(rows, tokenizer, [f"row {i}" for i in range(len(rows))])
    eos = tokenizer.eos_token_id
    for row, (got, length) in zip(rows, encoded, strict=True):
        if chat:
            texts = chat_pieces(
                [{"role": "user", "content": row.prompt}, {"role": "assistant", "content": row.response}],
                tokenizer,
                "row",
            )
            pieces = [(tokenizer.encode(text, add_special_tokens=False), learned) for text, learned in texts]
            if eos not in pieces[-1][0]:
                pieces[-1][0].append(eos)
        else:
            pieces = [
                (tokenizer.encode(row.prompt, add_special_tokens=True), False),
                ([*tokenizer.encode(row.response, add_special_tokens=False), eos], True),
            ]
        ids = [i for piece, _ in pieces for i in piece]
        labels = [i if learned else IGNORE for piece, learned in pieces for i in piece]
        prompt = len(ids) - len(pieces[-1][0])
        if prompt >= limit:  # no response token fits: left out, its prompt length reported
            assert (got, length) == (None, prompt)
            continue
        assert got is not None
        assert (got["input_ids"].tolist(), got["labels"].tolist()) == (ids[:limit], labels[:limit])
        assert got["prompt_ids"].tolist() == ids[:prompt]


def test_file_is_streamed_in_chunks_with_the_same_rows_numbers_and_subset(tmp_path: Path) -> None:
    records = review_rows("train", 25)
    path = write_jsonl(tmp_path / "train.jsonl", records)
    spec = resolve_spec(parse_recipe(lm_recipe(tmp_path, "llama", {"train_file": path}), "t").data)
    whole = list(file_row_chunks(spec, path, chunk_rows=1000))
    chunks = list(file_row_chunks(spec, path, chunk_rows=4))
    assert [len(c) for c in whole] == [25] and [len(c) for c in chunks] == [4] * 6 + [1]
    assert [r.where for c in chunks for r in c] == [f"{path}: row {n}" for n in range(1, 26)]
    subset = [r for c in file_row_chunks(spec, path, limit=7, seed=3, chunk_rows=4) for r in c]
    assert [r.where for r in subset] == [r.where for r in rows_from_file(spec, path, limit=7, seed=3)]
    assert len(subset) == 7
    # a bad row in a later chunk is named by file and row
    records[21] = {**records[21], "response": 5}
    write_jsonl(path, records)
    with pytest.raises(AfloraError, match=rf"^{path}: row 22: column 'response' has 5 \(int\), expected text$"):
        list(file_row_chunks(spec, path, chunk_rows=4))


def test_a_split_is_encoded_once_then_read_from_the_cache(
    tmp_path: Path, own_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = tiny_tokenizer()
    files = {
        "train_file": write_jsonl(tmp_path / "train.jsonl", review_rows("train", 30)),
        "validation_file": write_jsonl(tmp_path / "validation.jsonl", review_rows("validation", 6)),
    }
    # prompts of 28 to 50 tokens: a max_length of 44 leaves some rows no response token (skipped, counted)
    task = task_for(files, training={"max_length": 44})
    first = task.load_splits(tokenizer)
    assert 0 < first.skipped["train"] < 30 and first.train is not None
    cached = sorted(own_cache.glob("*.arrow"))
    assert len(cached) == 2  # one file per split
    with pyarrow.ipc.open_file(str(cached[0])) as reader:  # plain Arrow columns, nothing pickled
        assert set(reader.schema.names) <= {"input_ids", "labels", "prompt_ids", "source", "reference"}

    def no_encoding(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a cached split was encoded again")

    monkeypatch.setattr(CausalLMTask, "encode_many", no_encoding)
    again = task_for(files, training={"max_length": 44}).load_splits(tokenizer)
    assert isinstance(again.train, EncodedRows)
    assert as_lists(again.train) == as_lists(first.train)
    assert as_lists(again.evaluation["validation"]) == as_lists(first.evaluation["validation"])
    assert again.evaluation["validation"][0]["reference"] == review_rows("validation", 6)[0]["response"]
    assert (again.skipped, again.why_skipped) == (first.skipped, first.why_skipped)
    monkeypatch.undo()
    monkeypatch.setenv(CACHE_ENV, str(own_cache))

    # anything that changes the tokens is another entry: a longer max_length, train_on_prompt, ...
    longer = task_for(files, training={"max_length": 64}).load_splits(tokenizer)
    assert longer.skipped["train"] == 0 and len(longer.train or []) == 30
    task_for(files, training={"max_length": 44}, data={"train_on_prompt": True}).load_splits(tokenizer)
    assert len(list(own_cache.glob("*.arrow"))) == 2 + 2 + 2
    # ... and a changed file, even one of the same size written in the same second, is encoded anew
    rows = review_rows("train", 30)
    rows[0] = {**rows[0], "response": rows[0]["response"][::-1]}
    write_jsonl(files["train_file"], rows)
    changed = task_for(files, training={"max_length": 64}).load_splits(tokenizer)
    assert changed.train is not None and longer.train is not None
    assert as_lists(changed.train)[1:] == as_lists(longer.train)[1:]
    assert as_lists(changed.train)[0] != as_lists(longer.train)[0]


def test_a_named_hub_split_is_cached_under_its_datasets_fingerprint(
    tmp_path: Path, own_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GSM8K from the Hub (here `datasets`' json loader over local files, which fingerprints them as it fingerprints
    a Hub revision): encoded once, read back identical by the next run, encoded anew when the data set changes."""
    import datasets

    load_dataset = datasets.load_dataset
    splits = {"train": tmp_path / "train.jsonl", "test": tmp_path / "test.jsonl"}
    problems = [
        {"question": f"What is {n} plus {n}?", "answer": f"{n} + {n} = {2 * n}\n#### {2 * n}"} for n in range(9)
    ]
    write_jsonl(splits["train"], problems[:6])
    write_jsonl(splits["test"], problems[6:])
    loaded: list[tuple[str, str]] = []

    def hub(path: str, name: str) -> datasets.DatasetDict:
        loaded.append((path, name))
        files = {split: str(file) for split, file in splits.items()}
        return load_dataset("json", data_files=files, cache_dir=str(tmp_path / "hf"))

    monkeypatch.setattr(datasets, "load_dataset", hub)
    tokenizer = tiny_tokenizer()

    def gsm8k() -> CausalLMTask:
        raw = lm_recipe(Path("/tmp/unused"), "llama", {})
        raw["data"] = {"task": "gsm8k"}
        return CausalLMTask.from_recipe(parse_recipe(raw, "test"))

    first = gsm8k().load_splits(tokenizer)
    assert set(loaded) == {("openai/gsm8k", "main")} and len(first.train or []) == 6
    assert len(loaded) == 2  # one load per split, both to name it for the cache and to read its rows
    assert len(list(own_cache.glob("*.arrow"))) == 2  # train and test

    def no_encoding(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a cached split was encoded again")

    with monkeypatch.context() as patched:
        patched.setattr(CausalLMTask, "encode_many", no_encoding)
        again = gsm8k().load_splits(tokenizer)
    assert as_lists(again.train) == as_lists(first.train)
    assert as_lists(again.evaluation["test"]) == as_lists(first.evaluation["test"])

    write_jsonl(splits["train"], [{**problems[0], "question": "What is 0 plus nothing?"}, *problems[1:6]])
    changed = gsm8k().load_splits(tokenizer)
    assert len(list(own_cache.glob("*.arrow"))) == 2 + 2  # a new revision: new entries for both of its splits
    assert as_lists(changed.evaluation["test"]) == as_lists(first.evaluation["test"])
    assert as_lists(changed.train)[1:] == as_lists(first.train)[1:]
    assert as_lists(changed.train)[0] != as_lists(first.train)[0]


def test_a_full_disk_under_the_cache_costs_a_re_encoding_and_nothing_else(
    tmp_path: Path, own_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while a split is written to the cache: the run gets its rows as encoded, no partial file is left
    behind and nothing stale can be read; the next run encodes again and caches once there is room."""
    import errno
    import os

    import aflora_cli.tasks.encoded_cache as encoded_cache

    files = {"train_file": write_jsonl(tmp_path / "train.jsonl", review_rows("train", 8))}
    tokenizer = tiny_tokenizer()
    expected = as_lists(task_for(files).load_splits(tokenizer).train)
    for entry in own_cache.iterdir():
        entry.unlink()

    def full_disk(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patched:
        patched.setattr(encoded_cache.pyarrow.ipc, "new_file", full_disk)
        assert as_lists(task_for(files).load_splits(tokenizer).train) == expected
    assert list(own_cache.iterdir()) == []  # neither an entry nor a partial file
    assert as_lists(task_for(files).load_splits(tokenizer).train) == expected
    assert len(list(own_cache.glob("*.arrow"))) == 1


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_cache_entry_is_encoded_again_and_replaced(tmp_path: Path, own_cache: Path, damage: str) -> None:
    """A cache file a disk fault damaged is a miss, never rows read wrong: the split is encoded again, identical,
    and the entry is written anew."""
    files = {"train_file": write_jsonl(tmp_path / "train.jsonl", review_rows("train", 8))}
    tokenizer = tiny_tokenizer()
    expected = as_lists(task_for(files).load_splits(tokenizer).train)
    (entry,) = own_cache.glob("*.arrow")
    whole = entry.read_bytes()
    entry.write_bytes({"truncated": whole[: len(whole) // 2], "garbage": b"\x00not arrow" * 64, "empty": b""}[damage])
    assert as_lists(task_for(files).load_splits(tokenizer).train) == expected
    assert entry.read_bytes() == whole


def test_bad_rows_still_stop_the_run_with_file_and_row(tmp_path: Path) -> None:
    rows = review_rows("validation", 6)
    rows[4] = {**rows[4], "response": "   "}
    files = {
        "train_file": write_jsonl(tmp_path / "train.jsonl", review_rows("train", 8)),
        "validation_file": write_jsonl(tmp_path / "validation.jsonl", rows),
    }
    with pytest.raises(AfloraError, match=rf"^{files['validation_file']}: row 5: empty response in column"):
        task_for(files).load_splits(tiny_tokenizer())


def test_cache_dir_is_configurable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "here"))
    assert cache_dir() == tmp_path / "here"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "aflora" / "encoded"
    assert json.dumps(str(cache_dir()))


def test_the_benchmark_file_is_alpaca_layout_rows(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import data_prep

    path = tmp_path / "alpaca.jsonl"
    data_prep.build(9, path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 9 and all(set(row) == {"instruction", "input", "output"} for row in rows)
    assert [row["input"] == "" for row in rows] == [i % 3 == 0 for i in range(9)]
    assert all(row["output"].startswith("The review is ") and " Rating: " in row["output"] for row in rows)
