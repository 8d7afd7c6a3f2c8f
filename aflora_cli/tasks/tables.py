"""Reading local data files and drawing seeded subsets: what every task family's data loading shares.

Files are csv, tsv, jsonl, json (a list of objects) or parquet; a table comes back as columns by name. Hub
data sets load through `load_hub_dataset`, which turns every way of failing to reach the hub into one line.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aflora_cli.errors import AfloraError

Columns = dict[str, list[Any]]
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "datasets"  # aflora_cli/datasets


class TableRows(Sequence[dict[str, Any]]):
    """Encoded rows kept column by column in flat numpy arrays — as compact as a `datasets.Dataset`, without
    the second and a half that importing `datasets` (and pandas) costs every start-up. A column is either one
    value per row (a numpy array: labels) or a list of ints per row (token ids: one flat array and the
    offsets of its rows); a row comes back as a dict of plain Python values."""

    def __init__(self, columns: dict[str, np.ndarray | list[list[int]]]) -> None:
        self._scalars: dict[str, np.ndarray] = {}
        self._lists: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, values in columns.items():
            if isinstance(values, np.ndarray):
                self._scalars[name] = values
                continue
            lengths = np.fromiter((len(row) for row in values), dtype=np.int64, count=len(values))
            flat = np.fromiter(itertools.chain.from_iterable(values), dtype=np.int64, count=int(lengths.sum()))
            self._lists[name] = (flat, np.concatenate([[0], np.cumsum(lengths)]))
        self._names = list(columns)
        self._rows = len(next(iter(columns.values()))) if columns else 0

    def __len__(self) -> int:
        return self._rows

    def __getitem__(self, index: int | str) -> Any:  # type: ignore[override]
        """Row `index` as a dict, or (given a name) a whole column as a list."""
        if isinstance(index, str):
            if index in self._lists:
                flat, offsets = self._lists[index]
                return [flat[offsets[i] : offsets[i + 1]].tolist() for i in range(self._rows)]
            return self._scalars[index].tolist()
        if not -self._rows <= index < self._rows:
            raise IndexError(index)
        index %= self._rows
        row: dict[str, Any] = {}
        for name in self._names:
            if name in self._lists:
                flat, offsets = self._lists[name]
                row[name] = flat[offsets[index] : offsets[index + 1]].tolist()
            else:
                row[name] = self._scalars[name][index].item()
        return row

    @property
    def column_names(self) -> list[str]:
        return list(self._names)

    def dtype(self, name: str) -> str:
        """The numpy dtype of a column's values (`int64` token ids and class ids, `float32` targets)."""
        return str(self._lists[name][0].dtype if name in self._lists else self._scalars[name].dtype)


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
    lines = _delimited_lines(path, delimiter)
    header = next(lines)
    columns: Columns = {name: [] for name in header}
    for row in lines:
        for name, value in zip(header, row, strict=True):
            columns[name].append(value)
    return columns


def _read_jsonl(path: Path) -> Columns:
    """One JSON object per line; blank lines are skipped."""
    return _records_to_columns(list(_jsonl_records(path)), path)


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
    """A parquet table, values as Python objects (pyarrow imported here: most runs read no parquet file)."""
    import pyarrow
    import pyarrow.parquet

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


def stream_records(path: str | Path, chunk_rows: int = 10_000) -> Iterator[list[dict[str, Any]]]:
    """A local file's rows as lists of up to `chunk_rows` objects, read as they are needed: a large jsonl, csv,
    tsv or parquet file is never held whole (a .json list is, being one document). Errors as `read_table`'s."""
    path = Path(path)
    if not path.is_file():
        raise AfloraError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        raise AfloraError(f"{path}: unsupported file type {path.suffix!r}; expected one of {', '.join(_READERS)}")
    if suffix == ".parquet":
        return _parquet_chunks(path, chunk_rows)
    if suffix == ".json":
        columns = read_table(path)
        names = list(columns)
        count = len(columns[names[0]]) if names else 0
        whole = [{name: columns[name][i] for name in names} for i in range(count)]
        return iter([whole[i : i + chunk_rows] for i in range(0, count, chunk_rows)] or [[]])
    if suffix == ".jsonl":
        return _chunked(_utf8(_jsonl_records(path), path), chunk_rows)
    return _chunked(_utf8(_delimited_records(path, "," if suffix == ".csv" else "\t"), path), chunk_rows)


def _utf8(records: Iterator[dict[str, Any]], path: Path) -> Iterator[dict[str, Any]]:
    try:
        yield from records
    except UnicodeDecodeError:
        raise AfloraError(f"{path}: not a UTF-8 text file") from None


def _chunked(records: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    """Lists of `size` records; at least one list, empty for a file without rows."""
    chunk: list[dict[str, Any]] = []
    yielded = False
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk, yielded = [], True
    if chunk or not yielded:
        yield chunk


def _jsonl_records(path: Path) -> Iterator[dict[str, Any]]:
    """One JSON object per line; blank lines are skipped (rows are counted without them)."""
    number = 0
    with path.open(encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise AfloraError(f"{path}: line {line_number}: invalid JSON ({err.msg})") from None
            number += 1
            if not isinstance(record, dict):
                raise AfloraError(f"{path}: row {number} is a {type(record).__name__}, expected a JSON object")
            yield record


def _delimited_records(path: Path, delimiter: str) -> Iterator[dict[str, Any]]:
    """A csv or tsv file's rows as objects keyed by its header."""
    lines = _delimited_lines(path, delimiter)
    header = next(lines)
    for row in lines:
        yield dict(zip(header, row, strict=True))


def _delimited_lines(path: Path, delimiter: str) -> Iterator[list[str]]:
    """The header line (checked: present, no repeated names), then every non-blank row, checked to have as many
    fields as the header."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            rows = csv.reader(handle, delimiter=delimiter)
            header = next(rows, None)
            if header is None:
                raise AfloraError(f"{path}: empty file, expected a header line naming the columns")
            if len(set(header)) != len(header):
                raise AfloraError(f"{path}: repeated column names in the header: {', '.join(header)}")
            yield header
            for number, row in enumerate((row for row in rows if row), start=1):
                if len(row) != len(header):
                    raise AfloraError(f"{path}: row {number} has {len(row)} fields, the header has {len(header)}")
                yield row
    except csv.Error as err:
        raise AfloraError(f"{path}: not a valid {path.suffix[1:]} file: {err}") from None


def _parquet_chunks(path: Path, size: int) -> Iterator[list[dict[str, Any]]]:
    import pyarrow  # here: most runs read no parquet file
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.ParquetFile(path)
        yielded = False
        for batch in table.iter_batches(batch_size=size):
            yield batch.to_pylist()
            yielded = True
        if not yielded:
            yield []
    except pyarrow.ArrowException as err:
        raise AfloraError(f"{path}: not a readable parquet file ({err})") from None


# ------------------------------------------------------------------------------------- columns to labelled rows


# ------------------------------------------------------------------------------------------------- checks


def require_rows(columns: Columns, source: str) -> None:
    """A split needs at least one row."""
    if not any(columns.values()):
        raise AfloraError(f"{source}: no data rows")


def require_columns(columns: Columns, names: Sequence[str], source: str) -> None:
    """Each wanted column must be in the file."""
    for name in names:
        if name not in columns:
            present = ", ".join(columns) or "none"
            raise AfloraError(f"{source}: missing column {name!r} (columns present: {present})")


def texts(columns: Columns, name: str, source: str) -> list[str]:
    """A text column; every value must be a string."""
    values = columns[name]
    for number, value in enumerate(values, start=1):
        if not isinstance(value, str):
            shown = "no value" if value is None else f"{value!r} ({type(value).__name__})"
            raise AfloraError(f"{source}: row {number}: column {name!r} has {shown}, expected text")
    return values


# ------------------------------------------------------------------------------------------------ subsets


def choose_splits(available: dict[str, str], wanted: list[str] | None, task: str) -> dict[str, str]:
    """The eval splits a recipe asks for (`data.eval_splits`), in its order; all of them when it names none."""
    if wanted is None:
        return available
    for split in wanted:
        if split not in available:
            raise AfloraError(
                f"data.eval_splits: {split!r} is not an eval split of task {task!r}; available: {', '.join(available)}"
            )
    if not wanted:
        raise AfloraError("data.eval_splits: name at least one split")
    return {split: available[split] for split in wanted}


def subset_rows(count: int, limit: int | None, seed: int) -> list[int] | None:
    """`limit` row indices drawn at random with `seed`, in their original order; None means all rows."""
    if limit is None or limit >= count:
        return None
    return np.sort(np.random.default_rng(seed).choice(count, size=limit, replace=False)).tolist()


# ------------------------------------------------------------------------------------------------- the hub


def load_hub_dataset(hub_id: str, config: str | None, task: str) -> Any:
    """A data set from the Hugging Face Hub (or the local datasets cache), or one line saying what to do."""
    from datasets import load_dataset

    try:
        return load_dataset(hub_id, config)
    except OSError as err:  # ConnectionError, offline mode and a missing dataset are all OSErrors
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        where = f"{hub_id} ({config})" if config else hub_id
        raise AfloraError(
            f"data.task {task!r}: could not load {where} from the Hugging Face Hub ({reason}); "
            "connect to the network, or run with HF_DATASETS_OFFLINE=1 if it is already in the datasets cache, "
            "or use task 'custom' with local files"
        ) from None
