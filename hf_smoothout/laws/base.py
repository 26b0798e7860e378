"""The noise-law protocol: how a raw draw ``u`` (``U(-1, 1)`` or ``N(0, 1)``) becomes the noise ``tau``.

A law writes ``base + tau`` in one fused pass. ``reference`` is what the noise is scaled against: the weight
itself for the engine's per-parameter noise, the merged weight ``W + s*B*A`` for ``space="lora_merged"`` (whose
``base`` is the frozen ``W``). The engine, the merged space and every kernel use these objects, so a law is
implemented once.

Example:
    >>> import torch
    >>> from hf_smoothout.laws import get_noise_law
    >>> w, u, out = torch.zeros(2, 3), torch.ones(2, 3), torch.empty(2, 3)
    >>> _ = get_noise_law("none").apply_(out, w, u, 0.1)
    >>> torch.equal(out, w + 0.1 * u)
    True
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from ..noise import ROW_NORM_EPS, row_length, row_norms_

FUSED_FORMS = ("constant", "element", "row_norm", "row_length")
"""Multipliers of ``u`` a fused kernel knows: ``a``; ``a * w`` element-wise; ``a * ||w_row|| / (||u_row|| + eps)``;
``a * ||w_row|| / sqrt(n)``."""


class NoiseLaw:
    """One noise law. Subclasses set ``name`` and implement `apply_`, `remove_` and `typical_relative`."""

    name: ClassVar[str]
    row_scaled: ClassVar[bool] = False
    """Whether the noise is scaled per output row (needs per-row buffers, `row_scales_`)."""
    relative: ClassVar[bool] = True
    """Whether ``strength`` is relative to the weights (False: an absolute box, compared with the weights' scale)."""
    uses_reference: ClassVar[bool] = True
    """Whether the noise depends on the reference weights (False: the merged space skips building them)."""
    fused_form: ClassVar[str | None] = None
    """The law's multiplier of ``u`` in the terms a fused kernel computes in one pass (`FUSED_FORMS`), or ``None``
    when no fused kernel can run it."""

    def apply_(
        self,
        out: torch.Tensor,
        base: torch.Tensor,
        draw: torch.Tensor,
        strength: float,
        *,
        row_axis: int = 0,
        buffers: tuple[torch.Tensor, torch.Tensor] | None = None,
        reference: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Write ``base + tau`` into ``out`` (which may be ``base`` or ``draw``); return the per-row scale of a
        row-scaled law (to rebuild the same noise), else ``None``. ``reference`` (default ``base``) may be
        overwritten."""
        raise NotImplementedError

    def remove_(
        self, noisy: torch.Tensor, draw: torch.Tensor, strength: float, *, row_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Undo `apply_` in place on ``noisy`` given the same raw draw (equal up to rounding; may overwrite
        ``draw``)."""
        raise NotImplementedError

    def typical_relative(self, strength: float, distribution: str, params: list[torch.Tensor]) -> float:
        """Typical ``|tau_i| / |w_i|`` of one draw (median over weights, roughly)."""
        raise NotImplementedError


def mean_abs_draw(distribution: str) -> float:
    """``E|u|`` of the raw draw: 1/2 for ``U(-1, 1)``, ``sqrt(2/pi)`` for ``N(0, 1)``."""
    return 0.5 if distribution == "uniform" else math.sqrt(2.0 / math.pi)


class RowScaledLaw(NoiseLaw):
    """Per output row ``tau_row = multiplier_row * u_row``: the multiplier from the reference row's norm
    (``normalizes_draw``: divided by ``||u_row|| + eps``, else by ``sqrt(n)``)."""

    row_scaled: ClassVar[bool] = True
    normalizes_draw: ClassVar[bool] = True

    def row_scale_(
        self,
        reference: torch.Tensor,
        draw: torch.Tensor,
        strength: float,
        row_axis: int,
        buffers: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """The per-row multiplier, written into ``buffers[0]`` (``buffers[1]``: scratch for the draw's norms)."""
        scale, draw_norm = buffers
        row_norms_(reference, row_axis, out=scale)
        if not self.normalizes_draw:
            return scale.mul_(strength / math.sqrt(row_length(reference, row_axis)))
        row_norms_(draw, row_axis, out=draw_norm)
        return scale.div_(draw_norm.add_(ROW_NORM_EPS)).mul_(strength)

    def row_scales_(
        self,
        references: list[torch.Tensor],
        draws: list[torch.Tensor],
        strength: float,
        row_axes: list[int],
        buffers: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> list[torch.Tensor]:
        """`row_scale_` for many tensors, the per-row arithmetic as three ``torch._foreach_*`` ops (the same
        values; fewer kernel launches on a GPU)."""
        scales, draw_norms = [b[0] for b in buffers], [b[1] for b in buffers]
        if not self.normalizes_draw:
            for reference, axis, scale in zip(references, row_axes, scales, strict=True):
                row_norms_(reference, axis, out=scale)
            if scales:
                factors = [strength / math.sqrt(row_length(r, a)) for r, a in zip(references, row_axes, strict=True)]
                torch._foreach_mul_(scales, factors)
            return scales
        pairs = zip(references, draws, row_axes, scales, draw_norms, strict=True)
        for reference, draw, axis, scale, draw_norm in pairs:
            row_norms_(reference, axis, out=scale)
            row_norms_(draw, axis, out=draw_norm)
        if scales:
            torch._foreach_add_(draw_norms, ROW_NORM_EPS)
            torch._foreach_div_(scales, draw_norms)
            torch._foreach_mul_(scales, strength)
        return scales

    def apply_(self, out, base, draw, strength, *, row_axis=0, buffers=None, reference=None, scale=None):
        if scale is None:
            if buffers is None:
                raise ValueError(f"adapt={self.name!r} needs per-row buffers (see row_norm_buffers).")
            scale = self.row_scale_(base if reference is None else reference, draw, strength, row_axis, buffers)
        torch.addcmul(base, draw, scale, out=out)
        return scale

    def remove_(self, noisy, draw, strength, *, row_scale=None):
        if row_scale is None:
            raise ValueError(f"adapt={self.name!r} needs the row scale apply_ returned.")
        return noisy.addcmul_(draw, row_scale, value=-1.0)
