"""Summary statistics the studies report: mean ± std over seeds and paired 95 % intervals.

Example:
    >>> mean_std([0.9, 0.92], scale=100)
    '91.00 ± 1.41'
    >>> mean, low, high = paired_interval([1.0, 2.0, 3.0])
    >>> mean, round(low, 3), round(high, 3)
    (2.0, -0.484, 4.484)
"""

from __future__ import annotations

import math
import statistics


def mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """``"mean ± std"`` (sample std; 0 for one value; ``-`` for none; ``"n/a (k of n non-finite)"`` when a
    value is NaN or infinite, e.g. a measure of a diverged run).

    Example:
        >>> mean_std([1.0, float("nan")])
        'n/a (1 of 2 non-finite)'
    """
    if not values:
        return "-"
    bad = sum(not math.isfinite(v) for v in values)
    if bad:
        return f"n/a ({bad} of {len(values)} non-finite)"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * std:.{digits}f}"


def paired_interval(diffs: list[float]) -> tuple[float, float | None, float | None]:
    """Mean of paired differences and its two-sided 95 % t-interval (None with fewer than 2 pairs)."""
    from scipy.stats import t

    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return mean, None, None
    half = float(t.ppf(0.975, len(diffs) - 1)) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half
