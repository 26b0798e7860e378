"""``adapt="weight"``: ``tau = a * w * u`` element-wise (``|tau| <= a |w|`` for uniform ``u``)."""

from __future__ import annotations

import torch

from .base import NoiseLaw, mean_abs_draw


class WeightLaw(NoiseLaw):
    """``tau = a * reference * u``, element-wise.

    Example:
        >>> import torch
        >>> out = torch.empty(2)
        >>> _ = WeightLaw().apply_(out, torch.tensor([2.0, 4.0]), torch.ones(2), 0.5); out.tolist()
        [3.0, 6.0]
    """

    name = "weight"
    fused_form = "element"

    def apply_(self, out, base, draw, strength, *, row_axis=0, buffers=None, reference=None, scale=None):
        if reference is None or reference is base:
            torch.addcmul(base, draw, base, value=strength, out=out)
        else:  # a separate (scratch) reference, e.g. the merged weight: overwritten with reference * u
            torch.add(base, reference.mul_(draw), alpha=strength, out=out)
        return None

    def remove_(self, noisy, draw, strength, *, row_scale=None):
        return noisy.div_(draw.mul_(strength).add_(1.0))  # the weight was multiplied by 1 + a * u

    def typical_relative(self, strength: float, distribution: str, params: list[torch.Tensor]) -> float:
        return strength * mean_abs_draw(distribution)
