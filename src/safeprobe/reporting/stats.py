"""Mean, sample standard deviation and a Student-t 95% interval over seeds.

scipy gives the exact t quantile when it is installed; it is not a dependency of this
package, so a table (df 1-30) and a Cornish-Fisher expansion (df > 30, error < 1e-4)
stand in for it otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# two-sided 95%: the 0.975 quantile of Student's t for df = 1 .. 30
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
        2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
        2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
Z975 = 1.959964


def t_table(df: int) -> float:
    """0.975 quantile of Student's t without scipy: table, then an expansion around the normal."""
    if df < 1:
        raise ValueError(f"df={df}: a t quantile needs at least 1 degree of freedom")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def t975(df: int) -> float:
    """0.975 quantile of Student's t with `df` degrees of freedom (scipy when installed)."""
    try:
        from scipy.stats import t
    except ImportError:
        return t_table(df)
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
