"""Scores for generated text: GSM8K answer accuracy (and its sibling `number`), short-answer exact match and
ROUGE.

Each metric turns one (generated text, reference text) pair into a `RowScore`, so an evaluation can report
what was read from every answer, and aggregates rows into `{metric name: value}`. Every value is a fraction
in [0, 1]; a corpus figure is the mean of the per-row values (accuracy is the share of rows right, ROUGE is
the mean of per-row F-measures: the convention of Hugging Face `evaluate`'s ROUGE, not rouge-score's
bootstrap aggregate).
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aflora_cli.errors import AfloraError

# --- GSM8K --------------------------------------------------------------------------------------------------
#
# As the AFLoRA authors score GSM8K (their gsm8k/evaluate.py, from LLM-Adapters): remove every comma, take
# the LAST match of `-?\d+\.?\d*` as the prediction, and count it right when it is within 1e-3 of the
# reference. The same number grammar is kept on purpose so scores compare with the paper's:
# - an optional minus sign directly before the digits: "-3.5" is -3.5, but "16-3" reads as 16 and -3;
# - digits, then optionally a point and more digits: "1234.50" is 1234.5 and a sentence-final "18." is 18;
# - a leading-point decimal is not a number of its own: ".5" reads as 5 (rare in model output);
# - commas are removed first, so "$1,234.50" is 1234.5, and a European "3,5" reads as 35;
# - no exponents: "1e5" reads as 1 and 5.
TOLERANCE = 1e-3
_NUMBER = re.compile(r"-?\d+(?:\.\d*)?")


def _last_number_text(text: str) -> str | None:
    """The last number in `text` as written (commas removed, a trailing point dropped), or None."""
    matches = _NUMBER.findall(text.replace(",", ""))
    return matches[-1].rstrip(".") if matches else None


def last_number(text: str) -> float | None:
    """The last number in a generated answer (see the grammar above), or None when it has none."""
    number = _last_number_text(text)
    return None if number is None else float(number)


def gsm8k_reference(answer: str) -> float:
    """The final answer of a GSM8K solution: the number after its last `####` (commas removed).

    A bare number (GSM8K's `short_answer`) is accepted too. Anything else is a data error.
    """
    final = answer.rsplit("####", 1)[-1].replace(",", "").strip()
    try:
        return float(final)
    except ValueError:
        raise AfloraError(f"GSM8K reference has no '#### <number>' final answer: {answer[-60:]!r}") from None


def number_reference(answer: str) -> float:
    """The reference of `metric: number`: the last number in the reference text (the grammar above), as the
    authors score AddSub, MultiArith, SVAMP and math_10k's `answer` column. No number is a data error."""
    number = last_number(answer)
    if number is None:
        raise AfloraError(f"number reference has no number: {answer[-60:]!r}")
    return number


# --- Exact match --------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """The comparison form of a short answer.

    Unicode NFKC (full-width and compatibility characters become plain ones), casefold (a stronger
    lower-casing: "Straße" matches "STRASSE"), inner whitespace runs collapsed to one space, and whitespace and
    punctuation (Unicode category P*) stripped from both ends: ' "Paris." ' becomes "paris". Punctuation
    inside the answer and articles are kept: "U.S." matches "u.s" but not "US".
    """
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    start, end = 0, len(text)
    while start < end and _trimmable(text[start]):
        start += 1
    while end > start and _trimmable(text[end - 1]):
        end -= 1
    return text[start:end]


def _trimmable(char: str) -> bool:
    return char.isspace() or unicodedata.category(char).startswith("P")


# --- ROUGE --------------------------------------------------------------------------------------------------

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
# Sentence end: ".", "!" or "?", possibly followed by closing quotes or brackets, then whitespace.
_SENTENCE_END = re.compile(r"([.!?][\"'”’)\]]*)[^\S\n]+")


def split_sentences(text: str) -> str:
    """`text` with one sentence per line, the input rougeLsum expects.

    rouge-score's rougeLsum takes newlines as sentence boundaries; its own splitter needs nltk's punkt data,
    which is not available offline. This one breaks after ".", "!" or "?" (and any closing quotes or brackets)
    followed by spaces, and keeps existing newlines. It does not know abbreviations: "Dr. Smith" is split, a
    difference from punkt that can move rougeLsum slightly. The other ROUGE types ignore line breaks.
    """
    return _SENTENCE_END.sub(r"\1\n", text.strip())


@functools.cache
def _rouge_scorer() -> Any:
    """rouge-score's scorer, built once: stemming on (Porter, via nltk, no data download needed)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_scores(generated: str, reference: str) -> dict[str, float]:
    """F-measures of rouge1, rouge2, rougeL and rougeLsum, both texts split into sentence lines first."""
    scores = _rouge_scorer().score(split_sentences(reference), split_sentences(generated))  # (target, prediction)
    return {name: float(scores[name].fmeasure) for name in ROUGE_TYPES}


# --- The uniform interface ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowScore:
    """One generated answer scored against its reference.

    `extracted` is what was read from the generated text (the GSM8K number as written, or the normalised
    short answer), None when nothing could be read or the metric reads nothing (ROUGE); `correct` is None
    where right/wrong has no meaning (ROUGE).
    """

    extracted: str | None
    scores: dict[str, float]
    correct: bool | None


def _numeric_row(generated: str, target: float) -> RowScore:
    """Right when the last number of the generated text is within 1e-3 of the target; no number is wrong."""
    number = _last_number_text(generated)
    correct = number is not None and abs(float(number) - target) <= TOLERANCE
    return RowScore(extracted=number, scores={"accuracy": float(correct)}, correct=correct)


def _gsm8k_row(generated: str, reference: str) -> RowScore:
    return _numeric_row(generated, gsm8k_reference(reference))


def _number_row(generated: str, reference: str) -> RowScore:
    return _numeric_row(generated, number_reference(reference))


def _exact_match_row(generated: str, reference: str) -> RowScore:
    """Right when both sides are equal after `normalize_answer`."""
    prediction = normalize_answer(generated)
    correct = prediction == normalize_answer(reference)
    return RowScore(extracted=prediction or None, scores={"exact_match": float(correct)}, correct=correct)


def _rouge_row(generated: str, reference: str) -> RowScore:
    return RowScore(extracted=None, scores=rouge_scores(generated, reference), correct=None)


@dataclass(frozen=True)
class TextMetric:
    """A metric for generated text: per-row scoring and the corpus figures reported for a task."""

    names: tuple[str, ...]  # the keys of every row's scores and of the aggregate
    main: str  # the one figure that selects checkpoints and heads reports
    score_row: Callable[[str, str], RowScore]  # (generated text, reference text) -> RowScore
    answer: Callable[[str], Any] = str  # the reference as the metric reads it (GSM8K: its final number);
    # raises AfloraError for a reference the metric cannot read, so data can be checked when it is read

    def score(self, generated: Sequence[str], references: Sequence[str]) -> list[RowScore]:
        """Each generated text scored against the reference at the same position."""
        if len(generated) != len(references):
            raise ValueError(f"{len(generated)} generated texts for {len(references)} references")
        return [self.score_row(text, reference) for text, reference in zip(generated, references)]

    def aggregate(self, rows: Sequence[RowScore]) -> dict[str, float]:
        """The mean of each per-row value over `rows`."""
        if not rows:
            raise AfloraError("there are no rows to score: the evaluation split is empty")
        return {name: math.fsum(row.scores[name] for row in rows) / len(rows) for name in self.names}

    def compute(self, generated: Sequence[str], references: Sequence[str]) -> tuple[list[RowScore], dict[str, float]]:
        """Per-row records and corpus figures in one call."""
        rows = self.score(generated, references)
        return rows, self.aggregate(rows)


METRICS: dict[str, TextMetric] = {
    "gsm8k": TextMetric(names=("accuracy",), main="accuracy", score_row=_gsm8k_row, answer=gsm8k_reference),
    "number": TextMetric(names=("accuracy",), main="accuracy", score_row=_number_row, answer=number_reference),
    "exact_match": TextMetric(names=("exact_match",), main="exact_match", score_row=_exact_match_row),
    "rouge": TextMetric(names=ROUGE_TYPES, main="rougeL", score_row=_rouge_row),
}
