"""``adapt="filter"`` (AdaSmoothOut): every output row's noise has L2 norm ``a * ||w_row||``:
``tau_row = a * ||w_row|| * u_row / (||u_row|| + 1e-6)``."""

from __future__ import annotations

import math

import torch

from .base import RowScaledLaw, mean_abs_draw


class FilterLaw(RowScaledLaw):
    """AdaSmoothOut's per-row law.

    Example:
        >>> import torch
        >>> w, u = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]])
        >>> buffers = (torch.empty(1, 1), torch.empty(1, 1))
        >>> noisy = torch.empty_like(w)
        >>> _ = FilterLaw().apply_(noisy, w, u, 0.1, buffers=buffers)
        >>> round(float((noisy - w).norm()), 4)  # 0.1 * ||(3, 4)||
        0.5
    """

    name = "filter"
    fused_form = "row_norm"
    normalizes_draw = True

    def typical_relative(self, strength: float, distribution: str, params: list[torch.Tensor]) -> float:
        return strength * mean_abs_draw(distribution) * math.sqrt(3.0 if distribution == "uniform" else 1.0)
