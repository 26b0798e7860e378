"""Curvature of the loss from Hessian-vector products: the top eigenvalue and the trace.

``H`` is the Hessian of ``f`` (mean loss over a bounded set of batches, eval mode) with respect to
the trainable parameters. ``H v`` is computed by double backward (``d/dtheta <grad f, v>``), batch by
batch, with scaled-dot-product attention routed to its twice-differentiable math kernel.

* :func:`hessian_top_eigenvalue`: power iteration ``v <- H v / ||H v||`` from a random unit vector;
  the estimate is the Rayleigh quotient ``v^T H v``. It converges to the eigenvalue of largest
  *magnitude* (the top one at a minimum, where ``H`` is positive semi-definite), at a rate set by
  the ratio of the two largest magnitudes.
* :func:`hessian_trace`: Hutchinson's estimator ``tr H = E[z^T H z]`` with Rademacher ``z``
  (entries +-1); the result is the sample mean with its standard error ``std / sqrt(samples)``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Bowl(nn.Module):  # f(w) = 0.5 * w^T diag(1, 2, 5) w
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    ...     def forward(self, **batch):
    ...         return {"loss": 0.5 * (torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64) * self.w**2).sum()}
    >>> batches = [{"labels": torch.zeros(1)}]
    >>> round(hessian_top_eigenvalue(Bowl(), batches, tolerance=1e-12, progress=False).value, 6)
    5.0
    >>> hessian_trace(Bowl(), batches, samples=4, progress=False).value  # exact for a diagonal H
    8.0
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .batches import ForwardFn, collect_batches, model_device
from .objective import BatchObjective
from .params import ParameterVector
from .state import preserved_model


@dataclass
class HessianEigenvalue:
    """Result of :func:`hessian_top_eigenvalue`."""

    value: float
    iterations: int
    converged: bool
    relative_change: float
    seed: int
    num_parameters: int
    num_examples: int

    @property
    def std(self) -> float:
        """No spread for a single power iteration (0.0); present so every measure has ``value``/``std``."""
        return 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)


@dataclass
class HessianTrace:
    """Result of :func:`hessian_trace`: ``value`` is the mean of ``samples`` estimates, ``stderr`` its std error."""

    value: float
    std: float
    stderr: float
    samples: int
    seed: int
    num_parameters: int
    num_examples: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum(float((x * y).sum()) for x, y in zip(a, b, strict=True)))


def _setup(
    model: nn.Module, dataloader: Iterable[Mapping[str, Any]], max_batches: int | None, forward_fn: ForwardFn | None
) -> tuple[ParameterVector, BatchObjective]:
    vector = ParameterVector(model)
    batches = collect_batches(dataloader, max_batches, model_device(model))
    return vector, BatchObjective(model, batches, forward_fn)


def hessian_vector_product(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    vector: list[torch.Tensor],
    *,
    max_batches: int | None = 8,
    forward_fn: ForwardFn | None = None,
) -> list[torch.Tensor]:
    """``H v`` for ``v`` given per trainable parameter (same shapes, in the order of
    :func:`~hf_smoothout.analysis.params.trainable_parameters`); float64. The model is left untouched."""
    with preserved_model(model):
        params, objective = _setup(model, dataloader, max_batches, forward_fn)
        if len(vector) != len(params.params):
            raise ValueError(f"Expected one tensor per trainable parameter ({len(params.params)}), got {len(vector)}.")
        return objective.hessian_vector_product(params.params, vector)


def hessian_top_eigenvalue(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    *,
    max_iterations: int = 20,
    tolerance: float = 1e-4,
    max_batches: int | None = 8,
    seed: int = 0,
    forward_fn: ForwardFn | None = None,
    progress: bool = True,
) -> HessianEigenvalue:
    """Largest-magnitude Hessian eigenvalue by power iteration.

    Stops after ``max_iterations`` Hessian-vector products or once the Rayleigh quotient changes by
    less than ``tolerance`` relative to its value. The start vector comes from a CPU generator
    seeded with ``seed`` (torch's global generator is not used). The model is left untouched.
    """
    if not isinstance(max_iterations, int) or max_iterations < 1:
        raise ValueError(f"max_iterations must be a positive integer, got {max_iterations!r}.")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}.")
    with preserved_model(model):
        params, objective = _setup(model, dataloader, max_batches, forward_fn)
        generator = torch.Generator().manual_seed(seed)
        flat = torch.randn(params.numel, generator=generator, dtype=torch.float64)
        v = params.split(flat / flat.norm())
        value, change, converged, iteration = 0.0, math.inf, False, 0
        for iteration in tqdm(range(1, max_iterations + 1), desc="Hessian top eigenvalue", disable=not progress):
            hv = objective.hessian_vector_product(params.params, v)
            new_value = _dot(v, hv)
            norm = math.sqrt(_dot(hv, hv))
            change = abs(new_value - value) / max(abs(new_value), 1e-30)
            value = new_value
            if norm == 0.0:
                converged, change = True, 0.0
                break
            v = [t / norm for t in hv]
            if iteration > 1 and change <= tolerance:
                converged = True
                break
    return HessianEigenvalue(
        value=value,
        iterations=iteration,
        converged=converged,
        relative_change=change,
        seed=seed,
        num_parameters=params.numel,
        num_examples=objective.num_examples,
    )


def hessian_trace(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    *,
    samples: int = 10,
    max_batches: int | None = 8,
    seed: int = 0,
    forward_fn: ForwardFn | None = None,
    progress: bool = True,
) -> HessianTrace:
    """Hutchinson estimate of ``tr H`` from ``samples`` Rademacher vectors (seeded CPU generator).

    The model is left untouched.
    """
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}.")
    with preserved_model(model):
        params, objective = _setup(model, dataloader, max_batches, forward_fn)
        generator = torch.Generator().manual_seed(seed)
        estimates = []
        for _ in tqdm(range(samples), desc="Hessian trace", disable=not progress):
            signs = torch.randint(0, 2, (params.numel,), generator=generator).to(torch.float64).mul_(2).sub_(1)
            z = params.split(signs)
            estimates.append(_dot(z, objective.hessian_vector_product(params.params, z)))
    values = torch.tensor(estimates, dtype=torch.float64)
    std = float(values.std(correction=1)) if samples > 1 else 0.0
    return HessianTrace(
        value=float(values.mean()),
        std=std,
        stderr=std / math.sqrt(samples),
        samples=samples,
        seed=seed,
        num_parameters=params.numel,
        num_examples=objective.num_examples,
    )
