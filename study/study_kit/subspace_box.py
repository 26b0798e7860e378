"""How the random-subspace epsilon-sharpness box of ``hf_smoothout.analysis`` compares with the SmoothOut
authors' box, whose random directions have unit length.

* :func:`subspace_box_comparison` -- the half-widths of the two boxes around a model, compared.
* :func:`subspace_box_note` -- that comparison as a paragraph of a report.

Example:
    >>> box = subspace_box_comparison(torch.nn.Linear(20, 5), dim=3, epsilon=5e-4)
    >>> box["num_parameters"], box["min_ratio"] <= box["median_ratio"] <= box["max_ratio"]
    (105.0, True)
    >>> subspace_box_note("final-b4096-ghost-v0-s3", box).startswith("Subspace box vs the authors'")
    True
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hf_smoothout.analysis import ParameterVector, RandomSubspace


def subspace_box_comparison(model: nn.Module, dim: int, epsilon: float, seed: int = 0) -> dict[str, float]:
    """How our random-subspace box compares with the authors' (random directions normalized to unit length).

    Ours: ``x = x0 + A y``, ``A`` with standard normal entries, ``|y_j| <= eps (|(A^+ x0)_j| + 1)``. With the
    columns of ``A`` (the directions) normalized, ``Â = A D^-1``, the same box rule in our coordinates is
    ``|y_j| <= eps (|(A^+ x0)_j| + 1 / d_j)``, ``d_j = ||A_j|| ≈ sqrt(n)``. Returns the median and range over
    ``j`` of the half-width ratio ours / theirs (first subspace, ``seed``).
    """
    vector = ParameterVector(model)
    subspace = RandomSubspace(vector.numel, dim, seed)
    coordinates = subspace.pinv_apply(vector.get()).abs()
    squares = torch.zeros(dim, dtype=torch.float64)
    for block in subspace.blocks():
        squares += block.pow(2).sum(0)
    norms = squares.sqrt()
    ratio = (coordinates + 1.0) / (coordinates + 1.0 / norms)
    return {
        "num_parameters": float(vector.numel),
        "sqrt_n": math.sqrt(vector.numel),
        "median_column_norm": float(norms.median()),
        "median_abs_pinv_x0": float(coordinates.median()),
        "median_ratio": float(ratio.median()),
        "min_ratio": float(ratio.min()),
        "max_ratio": float(ratio.max()),
        "epsilon": epsilon,
    }


def subspace_box_note(key: str, box: dict[str, float]) -> str:
    """The paragraph that explains the box difference, with the numbers of :func:`subspace_box_comparison` on the
    model of run ``key``."""
    return (
        "Subspace box vs the authors': `RandomSubspace` draws `A` (n x M) with standard normal entries, so each "
        f"random direction has length ~sqrt(n) = {box['sqrt_n']:.0f} (measured median {box['median_column_norm']:.0f})"
        "; the authors normalize each random direction to unit length (the rows of their M x n matrix). The box "
        "rule `|y| <= eps (|A^+ x0| + 1)` is not invariant to that scale: in our coordinates theirs is "
        "`|y_j| <= eps (|(A^+ x0)_j| + 1/d_j)`. The public API has no option for normalized directions, so the "
        f"difference is recorded, not removed: on `{key}` (|A^+ x0| median "
        f"{box['median_abs_pinv_x0']:.3g}) our half-widths are {box['median_ratio']:.3g} times theirs (median over "
        f"the M coordinates; range {box['min_ratio']:.3g} to {box['max_ratio']:.3g}). Subspace values here are "
        "therefore not comparable in scale to the paper's; comparisons between our arms are."
    )
