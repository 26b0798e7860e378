"""One entry point for every sharpness measure, by name, with its knobs in one dataclass.

Measures (the names used by :class:`~hf_smoothout.analysis.callback.SharpnessCallback`, the CLI and
``sharpness.json``):

* ``epsilon`` -- Keskar epsilon-sharpness in the full parameter space (:mod:`.epsilon`);
* ``epsilon_subspace`` -- the same in a random ``subspace_dim``-dimensional subspace;
* ``hessian_top`` -- top Hessian eigenvalue by power iteration (:mod:`.hessian`);
* ``hessian_trace`` -- Hutchinson estimate of the Hessian trace.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(3, 1, bias=False)
    >>> forward = lambda m, b: {"loss": ((m(b["x"]) - b["labels"]) ** 2).mean()}
    >>> batches = [{"x": torch.eye(3), "labels": torch.zeros(3, 1)}]
    >>> result = measure_sharpness(model, batches, "hessian_trace", SharpnessOptions(trace_samples=3),
    ...                            forward_fn=forward, progress=False)
    >>> round(result.value, 6)  # H = 2/3 * X^T X = 2/3 * I: trace 2, exact for a diagonal H
    2.0
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from .batches import ForwardFn
from .epsilon import EpsilonSharpness, epsilon_sharpness
from .hessian import HessianEigenvalue, HessianTrace, hessian_top_eigenvalue, hessian_trace

MEASURES = ("epsilon", "epsilon_subspace", "hessian_top", "hessian_trace")

SharpnessResult = EpsilonSharpness | HessianEigenvalue | HessianTrace


@dataclass
class SharpnessOptions:
    """Knobs of every measure (each measure reads its own).

    Attributes:
        epsilon: box size of the epsilon measures.
        epsilon_iterations: L-BFGS-B iterations of the epsilon measures.
        subspace_dim: ``M`` of ``epsilon_subspace``.
        repeats: repeats (random starts/subspaces) of the epsilon measures; mean +- std.
        random_start: start each epsilon search at a random point of the box (else at the weights).
        power_iterations: maximum power iterations of ``hessian_top``.
        power_tolerance: relative change of the eigenvalue estimate that stops ``hessian_top``.
        trace_samples: Rademacher vectors of ``hessian_trace``.
        max_batches: batches of the dataloader in the loss (``None``: all; keep it bounded).
        seed: seed of all random draws (torch's global generator is never used).
    """

    epsilon: float = 5e-4
    epsilon_iterations: int = 10
    subspace_dim: int = 10
    repeats: int = 1
    random_start: bool = True
    power_iterations: int = 20
    power_tolerance: float = 1e-4
    trace_samples: int = 10
    max_batches: int | None = 8
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return asdict(self)


def check_measure(measure: str) -> str:
    """``measure`` if it is known, else ``ValueError`` listing the known ones."""
    if measure not in MEASURES:
        raise ValueError(f"Unknown sharpness measure {measure!r}; known measures: {', '.join(MEASURES)}.")
    return measure


def measure_sharpness(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    measure: str,
    options: SharpnessOptions | None = None,
    *,
    forward_fn: ForwardFn | None = None,
    progress: bool = True,
) -> SharpnessResult:
    """Compute ``measure`` (one of :data:`MEASURES`) of ``model`` on ``dataloader``; the model is left untouched.

    Every result has ``value``, ``std`` and ``to_dict()``.
    """
    check_measure(measure)
    o = options or SharpnessOptions()
    common = {"max_batches": o.max_batches, "seed": o.seed, "forward_fn": forward_fn, "progress": progress}
    if measure in ("epsilon", "epsilon_subspace"):
        return epsilon_sharpness(
            model,
            dataloader,
            epsilon=o.epsilon,
            max_iterations=o.epsilon_iterations,
            subspace_dim=o.subspace_dim if measure == "epsilon_subspace" else None,
            repeats=o.repeats,
            random_start=o.random_start,
            **common,
        )
    if measure == "hessian_top":
        return hessian_top_eigenvalue(
            model, dataloader, max_iterations=o.power_iterations, tolerance=o.power_tolerance, **common
        )
    return hessian_trace(model, dataloader, samples=o.trace_samples, **common)
