"""``adapt="none"`` (SmoothOut): ``tau = a * u``, an absolute box (uniform) or ball-like cloud (Gaussian)."""

from __future__ import annotations

import math

import torch

from .base import NoiseLaw, mean_abs_draw


class NoneLaw(NoiseLaw):
    """``tau = a * u``.

    Example:
        >>> import torch
        >>> out = torch.empty(2)
        >>> _ = NoneLaw().apply_(out, torch.zeros(2), torch.ones(2), 0.5); out.tolist()
        [0.5, 0.5]
    """

    name = "none"
    fused_form = "constant"
    relative = False
    uses_reference = False

    def apply_(self, out, base, draw, strength, *, row_axis=0, buffers=None, reference=None, scale=None):
        torch.add(base, draw, alpha=strength, out=out)
        return None

    def remove_(self, noisy, draw, strength, *, row_scale=None):
        return noisy.add_(draw, alpha=-strength)

    def typical_relative(self, strength: float, distribution: str, params: list[torch.Tensor]) -> float:
        """``a * E|u| / rms(w)`` of the median parameter (all-zero tensors, a fresh LoRA B, are left out)."""
        ratios = []
        for p in params:
            wide = torch.float32 if p.dtype.itemsize < 4 else None  # fp16/bf16 accumulate in fp32; fp64 stays
            norm = float(torch.linalg.vector_norm(p.detach(), dtype=wide)) if p.numel() else 0.0
            rms = norm / math.sqrt(p.numel()) if p.numel() else 0.0
            if rms > 0:
                ratios.append(strength * mean_abs_draw(distribution) / rms)
        return float(sorted(ratios)[len(ratios) // 2]) if ratios else math.inf
