"""Keskar et al.'s epsilon-sharpness: how much the loss can rise inside a small box around the weights.

For weights ``x0`` and loss ``f`` (mean loss over a bounded set of batches, eval mode, float64
accumulation), the box is ``C = {x : |x - x0| <= eps * (|x0| + 1)}`` element-wise and

    sharpness = 100 * (max_{x in C} f(x) - f(x0)) / (1 + f(x0)).

The maximum is approximated with SciPy's L-BFGS-B (bounded quasi-Newton) run for a fixed number
of iterations on ``-f`` (objective ``-f``, gradient ``-grad f``: maximizing with a minimizer).
``f_max`` is the largest loss seen at any point L-BFGS-B evaluated (all inside the box) and never
below ``f(x0)``, so the value is a lower bound of the true box maximum and is never negative.

In the random-subspace variant the search runs over ``x = x0 + A y`` with ``A`` a random
``n x M`` matrix (standard normal entries, drawn in fixed-size row blocks from seeded CPU
generators, so it is the same on every device) and the box
``|y| <= eps * (|A^+ x0| + 1)`` (``A^+`` the pseudo-inverse). The result is the mean +- std over
``repeats`` runs, each with its own random start (uniform in the box; at an exact stationary
point ``x0`` the gradient vanishes and a search started at ``x0`` would not move) and, in the
subspace variant, its own ``A``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Bowl(nn.Module):  # f(w) = 0.5 * 4 * w^2, minimum at 0
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    ...     def forward(self, **batch):
    ...         return {"loss": 2.0 * (self.w ** 2).sum()}
    >>> result = epsilon_sharpness(Bowl(), [{"labels": torch.zeros(1)}], epsilon=1e-2, progress=False)
    >>> round(result.value, 6)  # the box corner: 100 * 0.5 * 4 * 3 * 1e-4
    0.06
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import Bounds, minimize
from torch import nn
from tqdm.auto import tqdm

from .batches import ForwardFn, collect_batches, model_device
from .objective import BatchObjective
from .params import ParameterVector
from .state import preserved_model

SUBSPACE_BLOCK_ROWS = 1 << 16
"""Rows of ``A`` drawn per seeded block (part of the definition of ``A`` for a given seed)."""

_MAX_CACHED_SUBSPACE_ELEMENTS = 1 << 26  # 256 MiB in float32; larger ``A`` are regenerated on each use


def _block_seed(seed: int, block: int) -> int:
    return (seed * 0x9E3779B1 + block * 0x85EBCA77 + 0x165667B1) % (1 << 63)


class RandomSubspace:
    """The random ``n x M`` matrix ``A`` of the subspace variant, applied block by block.

    Example:
        >>> A = RandomSubspace(5, 2, seed=0)
        >>> A.dense().shape
        torch.Size([5, 2])
        >>> y = torch.tensor([1.0, -2.0], dtype=torch.float64)
        >>> torch.allclose(A.matvec(y), A.dense() @ y)
        True
    """

    def __init__(self, num_params: int, dim: int, seed: int) -> None:
        if dim < 1:
            raise ValueError(f"subspace_dim must be a positive integer, got {dim}.")
        self.num_params, self.dim, self.seed = num_params, dim, seed
        self._cache: list[torch.Tensor] | None = None
        if num_params * dim <= _MAX_CACHED_SUBSPACE_ELEMENTS:
            self._cache = list(self._generate())

    def _generate(self) -> Iterable[torch.Tensor]:
        for block, start in enumerate(range(0, self.num_params, SUBSPACE_BLOCK_ROWS)):
            rows = min(SUBSPACE_BLOCK_ROWS, self.num_params - start)
            generator = torch.Generator().manual_seed(_block_seed(self.seed, block))
            yield torch.randn(rows, self.dim, generator=generator)

    def blocks(self) -> Iterable[torch.Tensor]:
        """Row blocks of ``A`` in float64."""
        for block in self._cache if self._cache is not None else self._generate():
            yield block.double()

    def dense(self) -> torch.Tensor:
        """``A`` as one float64 tensor (small problems and tests)."""
        return torch.cat(list(self.blocks()))

    def matvec(self, y: torch.Tensor) -> torch.Tensor:
        """``A y`` (length ``n``)."""
        return torch.cat([block @ y for block in self.blocks()])

    def rmatvec(self, x: torch.Tensor) -> torch.Tensor:
        """``A^T x`` (length ``M``)."""
        out = torch.zeros(self.dim, dtype=torch.float64)
        for block, chunk in zip(self.blocks(), torch.split(x, SUBSPACE_BLOCK_ROWS), strict=True):
            out += block.T @ chunk
        return out

    def pinv_apply(self, x: torch.Tensor) -> torch.Tensor:
        """``A^+ x`` via ``(A^T A)^+ A^T x``."""
        gram = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        for block in self.blocks():
            gram += block.T @ block
        return torch.linalg.pinv(gram, hermitian=True) @ self.rmatvec(x)


@dataclass
class EpsilonSharpness:
    """Result of :func:`epsilon_sharpness`.

    ``value``/``std``: mean and std (ddof=0) of the per-repeat ``values``; ``loss`` is ``f(x0)``,
    ``max_losses`` the per-repeat ``f_max``; ``evaluations`` and ``stop_reasons`` (SciPy's message) per repeat.
    """

    value: float
    std: float
    values: list[float]
    loss: float
    max_losses: list[float]
    epsilon: float
    max_iterations: int
    subspace_dim: int | None
    repeats: int
    seed: int
    num_parameters: int
    num_examples: int
    evaluations: list[int] = field(default_factory=list)
    stop_reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)


def _check(epsilon: float, max_iterations: int, repeats: int) -> None:
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a positive finite number, got {epsilon!r}.")
    if not isinstance(max_iterations, int) or max_iterations < 1:
        raise ValueError(f"max_iterations must be a positive integer, got {max_iterations!r}.")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}.")


def epsilon_sharpness(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    *,
    epsilon: float = 5e-4,
    max_iterations: int = 10,
    subspace_dim: int | None = None,
    repeats: int = 1,
    max_batches: int | None = 8,
    seed: int = 0,
    random_start: bool = True,
    forward_fn: ForwardFn | None = None,
    progress: bool = True,
) -> EpsilonSharpness:
    """Keskar epsilon-sharpness of ``model`` on the first ``max_batches`` batches of ``dataloader``.

    Args:
        epsilon: relative box size ``eps``.
        max_iterations: L-BFGS-B iterations per repeat (function evaluations: about 4x that at most).
        subspace_dim: ``M`` for the random-subspace variant; ``None`` searches the full parameter space
            (L-BFGS-B then keeps about 20 float64 vectors of the parameter count).
        repeats: independent runs (random starts / random subspaces); the result is their mean +- std.
        max_batches: batches of ``dataloader`` in ``f`` (``None``: all).
        seed: seeds the random starts and subspaces (torch's global generator is not used).
        random_start: start each run at a uniform random point of the box (default), else at ``x0``.
        forward_fn: ``forward_fn(model, batch)`` returning the output; default ``model(**batch)``.
        progress: show a tqdm bar over loss evaluations.

    The model is left bit-identical, in its original mode, also if the loss raises.
    """
    _check(epsilon, max_iterations, repeats)
    if subspace_dim is not None and (not isinstance(subspace_dim, int) or subspace_dim < 1):
        raise ValueError(f"subspace_dim must be a positive integer or None, got {subspace_dim!r}.")
    with preserved_model(model):
        vector = ParameterVector(model)
        low = sorted({str(p.dtype) for p in vector.params if p.dtype in (torch.float16, torch.bfloat16)})
        if low:
            warnings.warn(
                f"epsilon_sharpness on {', '.join(low)} parameters: box offsets of relative size {epsilon:g} are "
                "mostly rounded away at that precision; measure a float32 (or float64) copy of the model.",
                stacklevel=2,
            )
        objective = BatchObjective(model, collect_batches(dataloader, max_batches, model_device(model)), forward_fn)
        x0 = vector.get()
        f0 = objective.loss()
        values, max_losses, evaluations, reasons = [], [], [], []
        bar = tqdm(desc="epsilon-sharpness", unit="eval", disable=not progress)
        try:
            for repeat in range(repeats):
                run_seed = seed + repeat
                f_max, count, reason = _maximize(
                    objective, vector, x0, f0, epsilon, max_iterations, subspace_dim, run_seed, random_start, bar
                )
                values.append(100.0 * (f_max - f0) / (1.0 + f0))
                max_losses.append(f_max)
                evaluations.append(count)
                reasons.append(reason)
        finally:
            bar.close()
    return EpsilonSharpness(
        value=float(np.mean(values)),
        std=float(np.std(values)),
        values=values,
        loss=f0,
        max_losses=max_losses,
        epsilon=float(epsilon),
        max_iterations=max_iterations,
        subspace_dim=subspace_dim,
        repeats=repeats,
        seed=seed,
        num_parameters=vector.numel,
        num_examples=objective.num_examples,
        evaluations=evaluations,
        stop_reasons=reasons,
    )


def _maximize(
    objective: BatchObjective,
    vector: ParameterVector,
    x0: torch.Tensor,
    f0: float,
    epsilon: float,
    max_iterations: int,
    subspace_dim: int | None,
    seed: int,
    random_start: bool,
    bar: tqdm,
) -> tuple[float, int, str]:
    """One L-BFGS-B run; returns (largest loss seen, number of evaluations, SciPy's stop message)."""
    generator = torch.Generator().manual_seed(seed)
    subspace = RandomSubspace(vector.numel, subspace_dim, seed) if subspace_dim is not None else None
    if subspace is None:
        radius = epsilon * (x0.abs() + 1.0)
        lower, upper = x0 - radius, x0 + radius
    else:
        radius = epsilon * (subspace.pinv_apply(x0).abs() + 1.0)
        lower, upper = -radius, radius
    if random_start:
        start = (lower + (upper - lower) * torch.rand(lower.shape, generator=generator, dtype=torch.float64)).numpy()
    else:
        start = (x0 if subspace is None else torch.zeros_like(radius)).numpy()
    best = [f0, 0]

    def negative_f(z: np.ndarray) -> tuple[float, np.ndarray]:
        z_t = torch.from_numpy(z)
        vector.set_(z_t if subspace is None else x0 + subspace.matvec(z_t))
        value, grads = objective.loss_and_grad(vector.params)
        flat = vector.flatten(grads)
        grad = flat if subspace is None else subspace.rmatvec(flat)
        best[0], best[1] = max(best[0], value), best[1] + 1
        bar.update(1)
        bar.set_postfix(loss=f"{value:.6g}", max=f"{best[0]:.6g}", refresh=False)
        return -value, -grad.numpy()

    outcome = minimize(
        negative_f,
        start,
        jac=True,
        method="L-BFGS-B",
        bounds=Bounds(lower.numpy(), upper.numpy()),
        options={"maxiter": max_iterations, "maxfun": 4 * max_iterations, "ftol": 0.0, "gtol": 0.0},
    )
    return best[0], best[1], str(outcome.message)
