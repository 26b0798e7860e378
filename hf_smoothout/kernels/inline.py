"""Inline CPU: draw and apply one parameter at a time in the calling thread (no worker threads).

The same numbers and the same arithmetic as `hf_smoothout.kernels.threads` (its draws, then its grouped law), in
one pass per parameter: each draw is still in cache when its row norms and fused add read it, and no ``_foreach``
call pays its CPU overhead. Chosen for CPU models below the worker-thread threshold.

Example:
    >>> from hf_smoothout.kernels import KERNELS
    >>> KERNELS["inline"].in_place
    False
"""

from __future__ import annotations

from ..plan import Plan
from ..restore import RestoreStrategy
from .base import DrawContext, DrawKernel, draw_raw_


class InlineKernel(DrawKernel):
    """One thread, CPU tensors with a second buffer, no collective and no sharded row blocks."""

    name = "inline"

    @classmethod
    def supports(cls, plan: Plan, restore: RestoreStrategy) -> bool:
        return (
            restore.second_buffer
            and plan.workers == 1
            and bool(plan.streams)
            and all(s.device.type == "cpu" and not s.collective for s in plan.streams)
            and all(slot.span is None for slot in plan.slots)
        )

    def draw_and_apply(self, ctx: DrawContext, strength: float) -> None:
        restore, law, distribution = ctx.restore, ctx.law, ctx.key.distribution
        for stream in ctx.plan.streams:
            for slot in stream.slots:
                u = restore.noisy(slot)
                draw_raw_(u, distribution, stream.generator)
                law.apply_(u, restore.clean(slot), u, strength, row_axis=slot.row_axis, buffers=slot.norms)
