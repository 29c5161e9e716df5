"""Mean, sample standard deviation and a Student-t 95% interval over seeds."""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy.stats import t


def t975(df: int) -> float:
    """0.975 quantile of Student's t with `df` degrees of freedom (two-sided 95%)."""
    if df < 1:
        raise ValueError(f"df={df}: a t quantile needs at least 1 degree of freedom")
    return float(t.ppf(0.975, df))


@dataclass(frozen=True)
class Stat:
    """Summary of one metric over seeds; std and interval are NaN below two values."""

    n: int
    mean: float
    std: float
    low: float
    high: float


def summarize(values: list[float]) -> Stat:
    """Mean, sample std (ddof=1) and mean +- t(0.975, n-1) * std / sqrt(n)."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(xs)
    if n == 0:
        return Stat(0, math.nan, math.nan, math.nan, math.nan)
    mean = sum(xs) / n
    if n == 1:
        return Stat(1, mean, math.nan, math.nan, math.nan)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t975(n - 1) * std / math.sqrt(n)
    return Stat(n, mean, std, mean - half, mean + half)
