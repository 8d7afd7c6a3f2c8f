"""Build the shipped `movie_reviews` data set from the VADER ground-truth movie review snippets.

The snippets come with the source archive of vaderSentiment 3.3.2 (Hutto & Gilbert, ICWSM 2014),
inside `additional_resources/hutto_ICWSM_2014.tar.gz`. Rows rated exactly 0 (neutral) are dropped,
the rest get a binary `label` (1 if the mean rating is positive) and keep their `rating`, and a fixed
seeded split sets aside validation and test rows. Running the script twice writes identical bytes.

    python scripts/make_movie_reviews.py                       # downloads the archive with pip
    python scripts/make_movie_reviews.py --archive vaderSentiment-3.3.2.tar.gz
"""

from __future__ import annotations

import argparse
import csv
import io
import random
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "vaderSentiment==3.3.2"
SDIST_ROOT = "vaderSentiment-3.3.2"
INNER_ARCHIVE = f"{SDIST_ROOT}/additional_resources/hutto_ICWSM_2014.tar.gz"
SNIPPETS = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
LICENSE = f"{SDIST_ROOT}/LICENSE.txt"
EXPECTED_ROWS = 10_605
SEED = 20140601
SPLIT_SIZES = {"validation": 1_000, "test": 1_000}
OUTPUT = Path(__file__).resolve().parent.parent / "aflora_cli" / "datasets" / "movie_reviews"
COLUMNS = ("sentence", "label", "rating")

Row = tuple[str, str, str]


def download_sdist(directory: Path) -> Path:
    """Fetch the vaderSentiment source archive (not a wheel: only the sdist has the data) with pip."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE]
    subprocess.run([*command, "-d", str(directory)], check=True)
    (archive,) = directory.glob("vaderSentiment-*.tar.gz")
    return archive


def read_member(archive: tarfile.TarFile, name: str) -> bytes:
    """The bytes of one file inside a tar archive."""
    member = archive.extractfile(name)
    if member is None:
        raise SystemExit(f"{name} is not a regular file in the archive")
    return member.read()


def read_sources(sdist: Path) -> tuple[str, bytes]:
    """The snippets file as text and the licence as bytes, both taken from the sdist."""
    with tarfile.open(sdist) as outer:
        license_text = read_member(outer, LICENSE)
        inner_bytes = read_member(outer, INNER_ARCHIVE)
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        snippets = read_member(inner, SNIPPETS).decode("utf-8")
    return snippets, license_text


def parse_snippets(text: str) -> list[Row]:
    """Rows of (sentence, label, rating) without the neutral ones; the rating keeps its source spelling."""
    records = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    if len(records) != EXPECTED_ROWS or any(len(record) != 3 for record in records):
        raise SystemExit(f"expected {EXPECTED_ROWS} rows of 3 tab-separated fields, got {len(records)} rows")
    rows = []
    for _id, rating, sentence in records:
        value = float(rating)
        if value != 0:
            rows.append((sentence, "1" if value > 0 else "0", rating))
    return rows


def split_rows(rows: list[Row]) -> dict[str, list[Row]]:
    """A seeded random split; each split keeps the rows in their source order."""
    order = list(range(len(rows)))
    random.Random(SEED).shuffle(order)
    splits, start = {}, 0
    for name, size in SPLIT_SIZES.items():
        splits[name] = sorted(order[start : start + size])
        start += size
    splits["train"] = sorted(order[start:])
    return {name: [rows[i] for i in indices] for name, indices in splits.items()}


def write_tsv(path: Path, rows: list[Row]) -> None:
    """Tab-separated with a header; a field holding a double quote is quoted with the quote doubled (RFC 4180)."""
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(rows)


def check_round_trip(path: Path, rows: list[Row]) -> None:
    """Read a written file back as a standard CSV reader does and insist on the very same rows."""
    with path.open(encoding="utf-8", newline="") as handle:
        back = [tuple(record) for record in csv.reader(handle, delimiter="\t")]
    if back != [COLUMNS, *rows]:
        raise SystemExit(f"{path}: rows differ when read back")


def main() -> None:
    """Parse arguments, build the splits and write them with the licence beside them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, help=f"the {PACKAGE} source archive; downloaded with pip if omitted")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        sdist = args.archive or download_sdist(Path(scratch))
        snippets, license_text = read_sources(sdist)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    for name, rows in split_rows(parse_snippets(snippets)).items():
        path = OUTPUT / f"{name}.tsv"
        write_tsv(path, rows)
        check_round_trip(path, rows)
        print(f"{path}: {len(rows)} rows, {sum(row[1] == '1' for row in rows)} positive")
    (OUTPUT / "LICENSE").write_bytes(license_text)


if __name__ == "__main__":
    main()
