"""Mean ± std over seeds and paired differences with a 95 % t-interval: the report's only statistics."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# Two-sided 95 % quantiles of Student's t by degrees of freedom; beyond the table the normal's 1.96.
T_975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
    11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
    21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042,
}  # fmt: skip


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value, NaN for none)."""
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class Paired:
    """Differences a - b seed by seed, their mean and the half-width of its 95 % t-interval."""

    differences: list[float]
    mean: float
    std: float
    half_width: float

    @property
    def verdict(self) -> str:
        """'holds' when the interval lies above zero, 'does not hold' below it, else 'within noise'."""
        if len(self.differences) < 2:
            return "too few seeds"
        if self.mean - self.half_width > 0:
            return "holds"
        if self.mean + self.half_width < 0:
            return "does not hold"
        return "within noise"


def paired(differences: list[float]) -> Paired:
    mean, std = mean_std(differences)
    n = len(differences)
    half = T_975.get(n - 1, 1.96) * std / math.sqrt(n) if n > 1 else math.nan
    return Paired(list(differences), mean, std, half)


def verdict(differences: list[float]) -> str:
    """The plain verdict on paired differences (better - worse) alone."""
    return paired(differences).verdict
