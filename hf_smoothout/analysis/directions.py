"""Random filter-normalized directions (Li et al., "Visualizing the Loss Landscape of Neural Nets").

A direction ``d`` has one tensor per trainable parameter. It is drawn from ``N(0, 1)`` and every
output row/filter is rescaled to the norm of the same row of the weights:
``d_row <- d_row * ||w_row|| / ||d_row||``, rows as in :mod:`hf_smoothout.selection` (``nn.Linear``,
``nn.Conv*d``, ``nn.Embedding``: axis 0; transformers' ``Conv1D`` and ``nn.ConvTranspose*d``: axis 1).
Biases, other 1-D parameters and normalization-layer parameters get a zero direction by default,
as Li et al. do; with ``include_one_dim=True`` they are filter-normalized too (each element its own
row: ``|d_i| = |w_i|`` with a random sign).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    >>> d = filter_normalized_direction(model, seed=0)
    >>> torch.allclose(d[0].norm(dim=1), model[0].weight.detach().double().norm(dim=1))
    True
    >>> [float(t.abs().sum()) for t in d[1:]]  # bias and LayerNorm: zero
    [0.0, 0.0, 0.0]
"""

from __future__ import annotations

import torch
from torch import nn

from .params import trainable_parameters

_ROW_NORM_EPS = 1e-12


def _rows_like(values: torch.Tensor, weight: torch.Tensor, row_axis: int) -> torch.Tensor:
    """Rescale every row of ``values`` to the norm of the same row of ``weight``."""
    if weight.ndim <= 1:
        return values.sign() * weight.abs()
    dims = tuple(d for d in range(weight.ndim) if d != row_axis)
    target = torch.linalg.vector_norm(weight, dim=dims, keepdim=True)
    current = torch.linalg.vector_norm(values, dim=dims, keepdim=True)
    return values * (target / (current + _ROW_NORM_EPS))


def filter_normalized_direction(
    model: nn.Module,
    *,
    seed: int = 0,
    include_one_dim: bool = False,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """A random filter-normalized direction over ``model``'s trainable parameters (float64, on their devices).

    The noise comes from ``generator`` (a CPU generator) or, if ``None``, one seeded with ``seed``; it
    is drawn on the CPU, so the direction is the same on every device. The model is not modified.
    """
    generator = generator or torch.Generator().manual_seed(seed)
    direction = []
    for entry in trainable_parameters(model):
        weight = entry.param.detach()
        values = torch.randn(weight.shape, generator=generator, dtype=torch.float64).to(weight.device)
        keep = include_one_dim or (weight.ndim > 1 and not entry.in_norm_layer)
        direction.append(_rows_like(values, weight.double(), entry.row_axis) if keep else torch.zeros_like(values))
    return direction
