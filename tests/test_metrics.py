"""GLUE metrics against values worked out by hand on small arrays."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from aflora_cli.tasks.classification import GLUE_TASKS, SHIPPED_TASKS, TaskSpec
from aflora_cli.tasks.classification_metrics import METRICS, compute_metrics


def _spec(problem: str, metrics: tuple[str, ...], num_labels: int = 2) -> TaskSpec:
    return TaskSpec(
        "t",
        ("sentence",),
        "label",
        problem,
        num_labels,
        None,
        metrics,
        metrics[0],  # type: ignore[arg-type]
        {"validation": "validation"},
    )


def _one_hot_logits(classes: list[int], num_labels: int = 2) -> np.ndarray:
    """Logits whose argmax is the given class, with some noise so they are not plain one-hot."""
    logits = np.random.default_rng(0).normal(scale=0.1, size=(len(classes), num_labels))
    logits[np.arange(len(classes)), classes] += 5.0
    return logits


# Confusion matrix: TP=3 (rows 0, 1, 6), FN=1 (row 2), FP=1 (row 5), TN=3 (rows 3, 4, 7).
LABELS = [1, 1, 1, 0, 0, 0, 1, 0]
PREDICTED = [1, 1, 0, 0, 0, 1, 1, 0]


def test_classification_metrics_match_the_confusion_matrix() -> None:
    spec = _spec("classification", ("matthews_correlation", "accuracy", "f1"))
    scores = compute_metrics(spec, _one_hot_logits(PREDICTED), np.array(LABELS))
    tp, tn, fp, fn = 3, 3, 1, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))  # 8 / 16
    assert scores["matthews_correlation"] == pytest.approx(mcc) == pytest.approx(0.5)
    assert scores["accuracy"] == pytest.approx(6 / 8)
    assert scores["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert list(scores) == ["matthews_correlation", "accuracy", "f1"]
    assert all(type(value) is float for value in scores.values())


def test_f1_is_for_the_positive_class() -> None:
    # TP=2, FN=2, FP=1: precision 2/3, recall 1/2, F1 = 2PR/(P+R) = 4/7.
    scores = compute_metrics(
        _spec("classification", ("f1",)), _one_hot_logits([1, 1, 0, 0, 1, 0]), np.array([1, 1, 1, 1, 0, 0])
    )
    assert scores["f1"] == pytest.approx(4 / 7)


def test_one_dimensional_predictions_are_class_ids() -> None:
    scores = compute_metrics(_spec("classification", ("accuracy",)), np.array(PREDICTED), np.array(LABELS))
    assert scores["accuracy"] == pytest.approx(0.75)


def test_multiclass_accuracy_uses_the_argmax() -> None:
    spec = GLUE_TASKS["mnli"]
    logits = _one_hot_logits([0, 1, 2, 2, 1], num_labels=3)
    assert compute_metrics(spec, logits, np.array([0, 1, 2, 0, 0])) == {"accuracy": pytest.approx(3 / 5)}


def test_pearson_and_spearman_by_hand() -> None:
    spec = _spec("regression", ("pearson", "spearman"), num_labels=1)
    # x = 1, 2, 3 and y = 1, 3, 2: deviations (-1, 0, 1) and (-1, 1, 0), so r = 1 / sqrt(2 * 2) = 0.5;
    # the values are their own ranks, so Spearman is 0.5 as well.
    scores = compute_metrics(spec, np.array([[1.0], [2.0], [3.0]]), np.array([1.0, 3.0, 2.0]))
    assert scores == {"pearson": pytest.approx(0.5), "spearman": pytest.approx(0.5)}


def test_spearman_sees_only_the_order() -> None:
    spec = _spec("regression", ("pearson", "spearman"), num_labels=1)
    x = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    scores = compute_metrics(spec, x, x**3)
    assert scores["spearman"] == pytest.approx(1.0)
    assert scores["pearson"] < 0.99


def test_degenerate_inputs_give_zero_without_warnings() -> None:
    regression = _spec("regression", ("pearson", "spearman"), num_labels=1)
    classification = _spec("classification", ("matthews_correlation", "f1"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compute_metrics(regression, np.full((4, 1), 0.3), np.array([0.1, 0.5, 0.2, 0.9])) == {
            "pearson": 0.0,
            "spearman": 0.0,
        }
        assert compute_metrics(regression, np.array([0.4]), np.array([0.1])) == {"pearson": 0.0, "spearman": 0.0}
        # Always predicting class 0: no true or false positives, so MCC and F1 are 0.
        assert compute_metrics(classification, _one_hot_logits([0, 0, 0, 0]), np.array([0, 1, 1, 0])) == {
            "matthews_correlation": 0.0,
            "f1": 0.0,
        }


def test_mismatched_lengths_are_rejected() -> None:
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        compute_metrics(_spec("classification", ("accuracy",)), _one_hot_logits([0, 1, 1]), np.array([0, 1]))


@pytest.mark.parametrize("spec", [*GLUE_TASKS.values(), *SHIPPED_TASKS.values()], ids=lambda spec: spec.name)
def test_every_built_in_task_names_known_metrics(spec: TaskSpec) -> None:
    assert set(spec.metrics) <= set(METRICS)
    assert spec.main_metric in spec.metrics


@pytest.mark.parametrize("rows", [1, 7, 1000, 1043, 40432])
def test_accuracy_is_the_same_float_as_scikit_learns(rows: int) -> None:
    from sklearn.metrics import accuracy_score

    generator = np.random.default_rng(rows)
    labels, predicted = generator.integers(0, 3, rows), generator.integers(0, 3, rows)
    spec = _spec("classification", ("accuracy",))
    assert compute_metrics(spec, predicted, labels)["accuracy"] == float(accuracy_score(labels, predicted))
