"""Evaluation metrics as GLUE defines them, computed from a model's raw outputs.

All values are fractions (accuracy 0.9, not 90). A correlation is undefined when either side is constant
or there are fewer than two rows; it is reported as 0.0 (no linear relation shown), the same convention
scikit-learn uses for a degenerate Matthews correlation, so checkpoint selection never compares a nan.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

Metric = Callable[[np.ndarray, np.ndarray], float]


class ScoredTask(Protocol):
    """What scoring needs to know of a task (a classification `TaskSpec` has it)."""

    @property
    def problem(self) -> str: ...

    @property
    def metrics(self) -> Sequence[str]: ...


def _accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows predicted right (the same float as scikit-learn's accuracy_score, without the second its
    import costs the first evaluation of every run)."""
    return float(np.mean(predictions == labels))


def _f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Binary F1 of the positive class 1; 0.0 when nothing is predicted or labelled positive."""
    from sklearn.metrics import f1_score  # scipy and scikit-learn load only when a task needs them

    return float(f1_score(labels, predictions, pos_label=1, average="binary", zero_division=0.0))


def _matthews(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation coefficient (CoLA's metric); 0.0 when a side is constant."""
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(labels, predictions))


def _degenerate(predictions: np.ndarray, labels: np.ndarray) -> bool:
    """True when a correlation is undefined: under two rows, or a constant side."""
    return len(labels) < 2 or np.ptp(predictions) == 0 or np.ptp(labels) == 0


def _pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Pearson correlation; 0.0 when undefined."""
    from scipy.stats import pearsonr

    return 0.0 if _degenerate(predictions, labels) else float(pearsonr(predictions, labels)[0])


def _spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Spearman rank correlation; 0.0 when undefined."""
    from scipy.stats import spearmanr

    return 0.0 if _degenerate(predictions, labels) else float(spearmanr(predictions, labels)[0])


METRICS: dict[str, Metric] = {
    "accuracy": _accuracy,
    "f1": _f1,
    "matthews_correlation": _matthews,
    "pearson": _pearson,
    "spearman": _spearman,
}


def compute_metrics(spec: ScoredTask, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's metrics, by name in the spec's order.

    `predictions` are logits: shape (n, num_labels) for classification (their argmax is the predicted
    class; an already 1-D array is taken as class ids), (n, 1) or (n,) for regression.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels).reshape(-1)
    if spec.problem == "classification":
        predicted = predictions.argmax(axis=-1) if predictions.ndim > 1 else predictions
    else:
        predicted = predictions.reshape(-1).astype(np.float64)
        labels = labels.astype(np.float64)
    if predicted.shape != labels.shape:
        raise ValueError(f"{predicted.shape[0]} predictions for {labels.shape[0]} labels")
    return {name: METRICS[name](predicted, labels) for name in spec.metrics}
