"""summary.png: after fine-tuning, harmful score against fine-tune accuracy, one point per setting.

The trade-off the method is about in one picture: lower-right is better (useful and safe).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from safeprobe.reporting.aggregate import Summary
from safeprobe.reporting.stats import Stat


def _bar(st: Stat) -> list[float]:
    """Asymmetric error bar from the 95% interval; none for a single seed."""
    if math.isnan(st.low):
        return [0.0, 0.0]
    return [st.mean - st.low, st.high - st.mean]


def plot(summary: Summary, path: Path) -> bool:
    """Write the plot; False (nothing written) when no group has both metrics after fine-tuning."""
    points = [(g, g.stats[("after", "fine_tune_accuracy")], g.stats[("after", "harmful_score")])
              for g in summary.groups
              if ("after", "fine_tune_accuracy") in g.stats and ("after", "harmful_score") in g.stats]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    colors, stacked = {}, Counter()
    for g, fa, hs in points:
        color = colors.setdefault(g.method, f"C{len(colors)}")
        ax.errorbar(fa.mean, hs.mean, xerr=[[v] for v in _bar(fa)], yerr=[[v] for v in _bar(hs)], fmt="o",
                    color=color, capsize=3)
        at = (round(fa.mean), round(hs.mean))  # labels of points that coincide are stacked, not overprinted
        ax.annotate(f"{g.label} (n={min(fa.n, hs.n)})", (fa.mean, hs.mean), textcoords="offset points",
                    xytext=(5, 5 + 10 * stacked[at]), fontsize=8, color=color)
        stacked[at] += 1
    ax.set_xlim(-3, 103)  # both are percentages: a fixed scale keeps sweeps comparable
    ax.set_ylim(-3, 103)
    ax.set_xlabel("fine-tune accuracy (%)")
    ax.set_ylabel("harmful score (%)")
    ax.set_title("After fine-tuning: mean over seeds, bars = 95% interval", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
