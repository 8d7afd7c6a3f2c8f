"""Encoded text rows kept in flat arrays, and a cache of them on disk so a split is tokenized once.

A split of a local file (or of a named task's Hub data set) is encoded on its first use and written as an Arrow
IPC file (plain columns, nothing pickled) under `cache_dir()`; every later run, `--resume`, `aflora eval` and the
other DDP ranks memory-map it instead of tokenizing again. Its name is a hash of everything that changes the
tokens: the file's content (a Hub split's `datasets` fingerprint), the tokenizer (vocabulary, merges,
normalizer, special tokens, chat template), the task spec (format, columns, template, truncation, metric) and
family, the length limits and the subset drawn. A changed file gets a new name, so a stale entry is never read;
old entries are left for the user to delete (`rm -r <cache dir>`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc

CACHE_ENV = "AFLORA_CACHE_DIR"
FORMAT_VERSION = 1  # bump when the layout of the cached columns changes
ID_COLUMNS = ("input_ids", "labels", "prompt_ids")  # int32 token ids, one list per row
TEXT_COLUMNS = ("source", "reference")  # kept for scored splits only
Row = dict[str, Any]


def cache_dir() -> Path:
    """Where encoded splits are kept: $AFLORA_CACHE_DIR, else $XDG_CACHE_HOME/aflora/encoded (~/.cache/...)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "aflora" / "encoded"


def file_digest(path: str | Path) -> str:
    """A hash of a file's bytes (BLAKE2b, read in 4 MiB blocks)."""
    digest = hashlib.blake2b(digest_size=20)
    with Path(path).open("rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """A hash of everything in a tokenizer that decides its ids: the fast tokenizer's full definition (or the
    vocabulary of a slow one), its special tokens and flags, and its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extras = {
        "class": type(tokenizer).__name__,
        "special": {key: str(value) for key, value in tokenizer.special_tokens_map.items()},
        "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "flags": [getattr(tokenizer, name, None) for name in ("add_bos_token", "add_eos_token")],
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    digest = hashlib.blake2b(definition.encode(), digest_size=20)
    digest.update(json.dumps(extras, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cache_key(fields: dict[str, Any]) -> str:
    """The cache entry's name for these key fields (JSON-able values)."""
    text = json.dumps({"version": FORMAT_VERSION, **fields}, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()


class EncodedRows(Sequence[Row]):
    """Encoded rows column by column: the token ids of all rows in one flat int32 array per column (with row
    offsets), texts in Arrow string arrays. A row comes back as a dict of numpy views and strings, as the
    per-row encoders return it; a memory-mapped cache file is read without copying."""

    def __init__(self, table: pa.Table) -> None:
        table = table.combine_chunks()
        self._ids: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._texts: dict[str, pa.Array] = {}
        for name in table.column_names:
            column = table.column(name)
            array = column.chunk(0) if column.num_chunks else pa.array([], column.type)
            if name in ID_COLUMNS:
                self._ids[name] = _list_buffers(array)
            else:
                self._texts[name] = array
        self._rows = table.num_rows
        self.table = table

    @classmethod
    def from_rows(cls, rows: Iterable[Row], *, text_columns: bool = False) -> EncodedRows:
        """Rows as the encoders return them: numpy id arrays, and `source` and `reference` with `text_columns`."""
        rows = list(rows)
        names = (*ID_COLUMNS, *TEXT_COLUMNS) if text_columns else ID_COLUMNS
        return cls.from_columns({name: [row[name] for row in rows] for name in names})

    @classmethod
    def from_columns(cls, columns: dict[str, list[Any]]) -> EncodedRows:
        """Id columns (lists of int arrays) and text columns (lists of str), built from raw buffers: `pa.array`
        on Python or numpy values would import pandas, seconds of start-up that nothing else here needs."""
        arrays = {
            name: _int32_lists(values) if name in ID_COLUMNS else _strings(values) for name, values in columns.items()
        }
        return cls(pa.Table.from_pydict(arrays))

    def __len__(self) -> int:
        return self._rows

    def __getitem__(self, index: int) -> Row:  # type: ignore[override]
        if not -self._rows <= index < self._rows:
            raise IndexError(index)
        index %= self._rows
        row: Row = {}
        for name, (flat, offsets) in self._ids.items():
            row[name] = flat[offsets[index] : offsets[index + 1]]
        for name, texts in self._texts.items():
            row[name] = texts[index].as_py()
        return row

    def lengths(self, name: str = "input_ids") -> list[int]:
        """Each row's token count in a column, without building the rows."""
        return np.diff(self._ids[name][1]).tolist()

    def token_bytes(self) -> int:
        """The bytes the token ids themselves take (all id columns)."""
        return sum(flat.nbytes for flat, _ in self._ids.values())


def _list_buffers(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A large_list<int32> array's values and row offsets as numpy views of its buffers (no copy; unlike
    `to_numpy`, this does not import pandas)."""
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64)[array.offset : array.offset + len(array) + 1]
    values = array.values
    flat = np.frombuffer(values.buffers()[1], dtype=np.int32)[values.offset :] if len(values) else np.zeros(0, np.int32)
    return flat, offsets


def _offsets(lengths: Iterable[int], count: int) -> np.ndarray:
    offsets = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(np.fromiter(lengths, dtype=np.int64, count=count), out=offsets[1:])
    return offsets


def _int32_lists(values: list[Any]) -> pa.Array:
    """A large_list<int32> column from one int array per row."""
    flat = np.concatenate(values).astype(np.int32, copy=False) if values else np.zeros(0, np.int32)
    offsets = _offsets((len(v) for v in values), len(values))
    children = pa.Array.from_buffers(pa.int32(), len(flat), [None, pa.py_buffer(flat)])
    return pa.Array.from_buffers(
        pa.large_list(pa.int32()), len(values), [None, pa.py_buffer(offsets)], children=[children]
    )


def _strings(values: list[str]) -> pa.Array:
    """A large_string column from Python strings."""
    encoded = [value.encode("utf-8") for value in values]
    offsets = _offsets((len(b) for b in encoded), len(encoded))
    data = pa.py_buffer(b"".join(encoded))
    return pa.Array.from_buffers(pa.large_string(), len(encoded), [None, pa.py_buffer(offsets), data])


def read_cached(key: str) -> tuple[EncodedRows, list[int]] | None:
    """A cached split (memory-mapped) and the prompt lengths of its skipped rows, or None on a miss."""
    path = cache_dir() / f"{key}.arrow"
    if not path.is_file():
        return None
    try:
        table = pyarrow.ipc.open_file(pa.memory_map(str(path))).read_all()
        meta = json.loads((table.schema.metadata or {}).get(b"aflora", b"{}"))
    except (pa.ArrowException, OSError, ValueError):
        return None  # unreadable (a disk fault): encode again and write it anew
    if meta.get("version") != FORMAT_VERSION or meta.get("rows") != table.num_rows:
        return None
    return EncodedRows(table), [int(n) for n in meta.get("skipped", [])]


def write_cached(key: str, rows: EncodedRows, skipped: Sequence[int]) -> str | None:
    """Store a split under `key`, atomically (written beside, then renamed): readers see all of it or nothing.
    A cache that cannot be written (read-only home, full disk) costs the next run a re-encoding, nothing else;
    why it could not be written is returned (None when it was), so that the run can say so."""
    folder = cache_dir()
    meta = {"version": FORMAT_VERSION, "rows": len(rows), "skipped": list(skipped)}
    table = rows.table.replace_schema_metadata({"aflora": json.dumps(meta)})
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=folder, prefix=f".{key}.", suffix=".partial")
        os.close(handle)
        try:
            with pa.OSFile(partial, "wb") as sink, pyarrow.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
            os.replace(partial, folder / f"{key}.arrow")
        finally:
            Path(partial).unlink(missing_ok=True)
    except OSError as err:
        return f"{folder}: {err.strerror or err}"
    return None
