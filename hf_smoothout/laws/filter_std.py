"""``adapt="filter_std"``: per output row of ``n`` elements ``tau_row = a * ||w_row|| / sqrt(n) * u_row``; the draw
is not normalized (with Gaussian ``u``: Flat-LoRA's law, row norm about ``a * ||w_row||``)."""

from __future__ import annotations

import torch

from .base import RowScaledLaw, mean_abs_draw


class FilterStdLaw(RowScaledLaw):
    """Flat-LoRA's per-row standard deviation law.

    Example:
        >>> import torch
        >>> w, u = torch.tensor([[3.0, 4.0]]), torch.ones(1, 2)
        >>> noisy = torch.empty_like(w)
        >>> _ = FilterStdLaw().apply_(noisy, w, u, 0.1, buffers=(torch.empty(1, 1), torch.empty(1, 1)))
        >>> [round(x, 4) for x in (noisy - w).flatten().tolist()]  # 0.1 * 5 / sqrt(2) each
        [0.3536, 0.3536]
    """

    name = "filter_std"
    fused_form = "row_length"
    normalizes_draw = False

    def typical_relative(self, strength: float, distribution: str, params: list[torch.Tensor]) -> float:
        return strength * mean_abs_draw(distribution)
