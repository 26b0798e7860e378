"""Pieces of the studies' ``report.md``: markdown tables and sections, cell summaries, paired comparisons, curves.

* :func:`table_lines`, :func:`section` -- a markdown table as lines (a placeholder line when it has no rows), and
  a ``## title`` section around it.
* :func:`value_label`, :func:`cell_summary` -- a final cell's value (``0.3 (strength)``) and ``mean ± std`` of one
  measure over its seeds.
* :func:`by_seed`, :func:`paired_differences`, :func:`paired_interval_row`, :func:`gap_share_row` -- comparisons
  of two arms paired by seed (mean with a 95 % t-interval; share of a gap recovered).
* :func:`plot_mean_curves` -- per-epoch curves, mean line and mean ± std band over seeds, one panel per group.

Example:
    >>> ghost = {0: 0.876, 1: 0.874}
    >>> ada = {0: 0.880, 1: 0.881}
    >>> for line in section("Paired difference", PAIRED_HEADER, [paired_interval_row("ada", ada, ghost, [0, 1])]):
    ...     print(line)
    <BLANKLINE>
    ## Paired difference
    <BLANKLINE>
    | arm | pairs | mean (points) | 95 % t-interval | per seed |
    |---|---|---|---|---|
    | ada | 2 | +0.55 | [-1.36, +2.46] | 0: +0.40, 1: +0.70 |
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hf_smoothout.modelcard import markdown_table

from .stats import mean_std, paired_interval

PAIRED_HEADER = ["arm", "pairs", "mean (points)", "95 % t-interval", "per seed"]
"""The columns of :func:`paired_interval_row`."""


def table_lines(header: list[str], rows: Sequence[Sequence[str]], empty: str | None = None) -> list[str]:
    """The markdown table as lines; ``[empty]`` instead when there are no rows and ``empty`` is given.

    Example:
        >>> table_lines(["arm"], [], "(no runs yet)"), table_lines(["arm"], [["ghost"]])
        (['(no runs yet)'], ['| arm |', '|---|', '| ghost |'])
    """
    return markdown_table(header, rows).splitlines() if rows or empty is None else [empty]


def large_batch_header(sharpness: str) -> list[str]:
    """The columns of the large-batch studies' final table; ``sharpness`` names the epsilon-sharpness column.

    Example:
        >>> large_batch_header("eps-sharpness (10-D)")[-3:]
        ['eps-sharpness (10-D)', 'Hessian top eig', 'time/run s']
    """
    measures = ["test acc %", "train acc %", "train-test gap %", sharpness, "Hessian top eig"]
    return ["batch", "method", "strength", *measures, "time/run s"]


def section(title: str, header: list[str], rows: Sequence[Sequence[str]], empty: str = "(no pairs yet)") -> list[str]:
    """A blank line, ``## title``, a blank line and :func:`table_lines`.

    Example:
        >>> section("Gap", ["arm"], [])
        ['', '## Gap', '', '(no pairs yet)']
    """
    return ["", f"## {title}", "", *table_lines(header, rows, empty)]


def value_label(value: float, tunes: str | None = None, follows: str | None = None) -> str:
    """``0.1 (strength)`` for a tuned arm, ``0.1 (of adasmoothout)`` for one that takes another arm's value, ``0``.

    Example:
        >>> value_label(0.3, tunes="strength"), value_label(0.3, follows="adasmoothout"), value_label(0.0)
        ('0.3 (strength)', '0.3 (of adasmoothout)', '0')
    """
    if tunes:
        return f"{value:g} ({tunes})"
    return f"{value:g} (of {follows})" if follows else f"{value:g}"


def cell_summary(records: list[dict[str, Any]], name: str, scale: float = 1.0, digits: int = 2) -> str:
    """``mean ± std`` of measure ``name`` over the records that have it (see :func:`study_kit.stats.mean_std`).

    Example:
        >>> cell_summary([{"gap": 0.02}, {"gap": 0.04}, {"gap": None}], "gap", 100)
        '3.00 ± 1.41'
    """
    return mean_std([r[name] for r in records if r.get(name) is not None], scale, digits)


def by_seed(records: Iterable[dict[str, Any]], measure: str = "test_accuracy") -> dict[int, float]:
    """``{seed: measure}`` of a cell's records.

    Example:
        >>> by_seed([{"seed": 0, "test_accuracy": 0.9}, {"seed": 1, "test_accuracy": 0.8}])
        {0: 0.9, 1: 0.8}
    """
    return {r["seed"]: r[measure] for r in records}


def paired_differences(ours: dict[int, float], reference: dict[int, float], seeds: Iterable[int]) -> list[float]:
    """``ours - reference`` for every seed of ``seeds`` (in that order) that both have.

    Example:
        >>> paired_differences({0: 0.9, 1: 0.8}, {1: 0.7, 2: 0.6}, [0, 1, 2])
        [0.10000000000000009]
    """
    return [ours[s] - reference[s] for s in seeds if s in ours and s in reference]


def paired_interval_row(
    name: str, ours: dict[int, float], reference: dict[int, float], seeds: Iterable[int], sign: int = 1
) -> list[str] | None:
    """A :data:`PAIRED_HEADER` row: ``sign x (ours - reference)`` in points per seed, their mean and 95 %
    t-interval; None when no seed has both.

    Example:
        >>> paired_interval_row("sam", {0: 0.5}, {0: 0.25}, [0])
        ['sam', '1', '+25.00', 'n/a (one pair)', '0: +25.00']
    """
    paired = [s for s in seeds if s in ours and s in reference]
    if not paired:
        return None
    diffs = [round(100 * sign * d, 10) + 0.0 for d in paired_differences(ours, reference, paired)]  # no "-0.00"
    mean, low, high = paired_interval(diffs)
    interval = "n/a (one pair)" if low is None else f"[{low:+.2f}, {high:+.2f}]"
    per_seed = ", ".join(f"{s}: {d:+.2f}" for s, d in zip(paired, diffs, strict=True))
    return [name, str(len(paired)), f"{mean:+.2f}", interval, per_seed]


def gap_share_row(
    name: str, ours: dict[int, float], low: dict[int, float], high: dict[int, float], seeds: Iterable[int]
) -> list[str] | None:
    """``[name, seeds, share of the mean gap, per seed]``: how much of the gap ``high - low`` the arm recovers,
    ``(ours - low) / (high - low)``; None when no seed has all three and a gap.

    Example:
        >>> gap_share_row("ada", {0: 0.88, 1: 0.89}, {0: 0.87, 1: 0.87}, {0: 0.91, 1: 0.90}, [0, 1])
        ['ada', '2', '43 %', '25 %, 67 %']
    """
    paired = [s for s in seeds if s in ours and s in low and s in high and high[s] != low[s]]
    if not paired:
        return None
    shares = [(ours[s] - low[s]) / (high[s] - low[s]) for s in paired]
    overall = statistics.mean(ours[s] - low[s] for s in paired) / statistics.mean(high[s] - low[s] for s in paired)
    return [name, str(len(paired)), f"{100 * overall:.0f} %", ", ".join(f"{100 * x:.0f} %" for x in shares)]


def plot_mean_curves(
    path: Path,
    panels: dict[str, str],
    series: list[tuple[str, str, list[list[float]]]],
    *,
    scale: float = 100.0,
    ylabel: str = "test accuracy %",
) -> Path | None:
    """Per series ``(panel, label, curves)``: the mean curve over the seeds' curves (cut to the shortest) with a
    mean ± std band, in panel ``panel`` (``panels`` maps it to its title), labelled ``label (n=seeds)``; colours
    follow the series' positions. Written as a PNG to ``path``; None (nothing written) without series.

    Example:
        >>> plot_mean_curves(Path("/tmp/curves.png"), {"large": "batch 4096"}, [("large", "ghost", [[0.8, 0.9]])])
        PosixPath('/tmp/curves.png')
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not series:
        return None
    figure = Figure(figsize=(6 * len(panels), 4.5), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = {key: figure.add_subplot(1, len(panels), i + 1) for i, key in enumerate(panels)}
    for index, (panel, label, all_curves) in enumerate(series):
        curves = [c for c in all_curves if c]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        epochs = list(range(1, length + 1))
        means = [scale * statistics.mean(c[i] for c in curves) for i in range(length)]
        stds = [scale * (statistics.stdev([c[i] for c in curves]) if len(curves) > 1 else 0.0) for i in range(length)]
        color = f"C{index % 10}"
        axes[panel].plot(epochs, means, color=color, label=f"{label} (n={len(curves)})")
        axes[panel].fill_between(
            epochs,
            [m - s for m, s in zip(means, stds, strict=True)],
            [m + s for m, s in zip(means, stds, strict=True)],
            color=color,
            alpha=0.2,
        )
    for key, axis in axes.items():
        axis.set_title(panels[key], fontsize="medium")
        axis.set_xlabel("epoch")
        axis.set_ylabel(ylabel)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize="small", loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
