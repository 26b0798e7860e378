"""Sweeps on log grids that extend from an edge: where a sweep stands, and which value it chooses.

A sweep scores every point of its grid (one seed, a validation measure). When the best point sits on an edge of
the grid, one more point goes one log step beyond that edge, until the best point is interior or
``max_extensions`` points were added.

* :func:`extension_point` -- the next point beyond an edge (same log step as the two edge points).
* :func:`sweep_state` -- replays a sweep from the scores found so far: its grid, the points still to run, the choice.
* :func:`run_sweep` -- runs the points a sweep still lacks, extensions included, until it has chosen.
* :func:`best_value` -- the best-scoring value of a list of ``(value, score)`` pairs, ties to the larger or smaller.
* :func:`point_label` -- a grid point as the report shows it (``0.01 (chosen)``, ``3.33 (extension)``).
* :func:`check_sweep_split` -- a sweep must not use one of the final seeds, nor score on an empty holdout.

Example:
    >>> scores = {0.01: 0.5, 0.1: 0.7}
    >>> state = sweep_state("adasmoothout", [0.01, 0.1], scores.get, max_extensions=2)
    >>> state.todo, state.extensions  # the best is at the upper edge: one log step (x10) further
    ([1.0], [1.0])
    >>> scores[1.0] = 0.6
    >>> sweep_state("adasmoothout", [0.01, 0.1], scores.get, max_extensions=2).chosen
    0.1
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal


def extension_point(grid: list[float], low: bool) -> float:
    """The next grid point beyond an edge, one log step (that of the two edge points) further, 3 digits.

    Example:
        >>> extension_point([1e-4, 3e-4, 1e-3], low=True), extension_point([0.1, 0.3, 1.0], low=False)
        (3.33e-05, 3.33)
    """
    inner, edge = (grid[1], grid[0]) if low else (grid[-2], grid[-1])
    return float(f"{edge * edge / inner:.3g}")


@dataclass
class SweepState:
    """Where one sweep stands: its grid so far (base + extensions), points still to run, the choice.

    ``chosen`` is None while points are still to run; ``at_edge`` is True when the choice sits on an edge
    because the extension limit was reached.
    """

    arm: str
    grid: list[float]
    extensions: list[float]
    todo: list[float]
    chosen: float | None
    at_edge: bool = False


def best_value(scored: Iterable[tuple[float, float]], prefer: Literal["larger", "smaller"] = "larger") -> float | None:
    """The value of the highest score among ``(value, score)`` pairs; ties go to the ``prefer`` value; None for none.

    Example:
        >>> best_value([(0.1, 0.8), (0.3, 0.8), (1.0, 0.7)]), best_value([(0.1, 0.8), (0.3, 0.8)], prefer="smaller")
        (0.3, 0.1)
    """
    sign = 1.0 if prefer == "larger" else -1.0
    pairs = list(scored)
    return max(pairs, key=lambda pair: (pair[1], sign * pair[0]))[0] if pairs else None


def sweep_state(
    arm: str, base_grid: Iterable[float], score: Callable[[float], float | None], max_extensions: int
) -> SweepState:
    """Replay a sweep from its scores (``score(value)`` is None for a point not run yet): extend while the best
    (highest score; ties go to the larger value) sits on an edge, up to ``max_extensions`` points.

    Example:
        >>> sweep_state("sam", [0.05, 0.005, 0.015], {}.get, max_extensions=2).todo  # sorted, nothing run yet
        [0.005, 0.015, 0.05]
    """
    grid = sorted(set(base_grid))
    extensions: list[float] = []
    while True:
        todo = [v for v in grid if score(v) is None]
        if todo:
            return SweepState(arm, grid, extensions, todo, None)
        best = best_value((v, score(v)) for v in grid)
        index = grid.index(best)
        at_edge = len(grid) >= 2 and index in (0, len(grid) - 1)
        if not at_edge or len(extensions) >= max_extensions:
            return SweepState(arm, grid, extensions, [], best, at_edge)
        point = extension_point(grid, low=index == 0)
        extensions.append(point)
        grid = sorted([*grid, point])


def run_sweep(state_of: Callable[[], SweepState], run_point: Callable[[float], object]) -> SweepState:
    """Run the points ``state_of()`` still lists (``run_point(value)`` records their scores) until the sweep has
    chosen; prints the choice and returns the final state.

    Example:
        >>> scores = {}
        >>> state = run_sweep(lambda: sweep_state("sam", [0.1, 1.0], scores.get, 1), lambda v: scores.update({v: -v}))
        Sweep sam: chosen 0.01 (still at the grid edge: extension limit reached); extensions [0.01]
    """
    while True:
        state = state_of()
        if not state.todo:
            edge = " (still at the grid edge: extension limit reached)" if state.at_edge else ""
            print(f"Sweep {state.arm}: chosen {state.chosen:g}{edge}; extensions {state.extensions}", flush=True)
            return state
        for value in state.todo:
            run_point(value)


def point_label(state: SweepState, value: float) -> str:
    """``value`` with its marks in the sweep: ``(chosen)``, ``(extension)`` or both.

    Example:
        >>> point_label(SweepState("sam", [0.005, 0.015], [0.005], [], 0.005), 0.005)
        '0.005 (chosen, extension)'
    """
    marks = [m for m, on in (("chosen", value == state.chosen), ("extension", value in state.extensions)) if on]
    return f"{value:g}" + (f" ({', '.join(marks)})" if marks else "")


def check_sweep_split(options: Any) -> None:
    """Raise when ``options.holdout_fraction`` (where the options have one) is not in (0, 1), or when
    ``options.sweep_seed`` is one of the final ``options.seeds`` (the sweep must not pick their noise).

    Example:
        >>> from types import SimpleNamespace
        >>> check_sweep_split(SimpleNamespace(holdout_fraction=0.1, sweep_seed=0, seeds=[0, 1]))
        Traceback (most recent call last):
        ValueError: --sweep_seed must differ from the final --seeds (the sweep must not pick their noise).
    """
    holdout = getattr(options, "holdout_fraction", 0.5)
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"--holdout_fraction must be in (0, 1), got {holdout}.")
    if options.sweep_seed in options.seeds:
        raise ValueError("--sweep_seed must differ from the final --seeds (the sweep must not pick their noise).")
