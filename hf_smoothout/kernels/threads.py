"""Worker threads, then grouped arithmetic: the general path for a second buffer (any device, any placement).

The raw draws run on the worker threads (numpy and torch's CPU generator run one thread each and release the GIL;
device and collective streams run in the calling thread), straight into the noisy buffers; then the law's
arithmetic runs in the calling thread, grouped by device and dtype (``_foreach`` row norms), where torch's
intra-op threads are not competing with the workers.

Example:
    >>> from hf_smoothout.kernels import KERNELS
    >>> KERNELS["threads"].in_place
    False
"""

from __future__ import annotations

from ..plan import Plan
from ..restore import RestoreStrategy
from .base import DrawContext, DrawKernel, apply_law, draw_stream


class ThreadsKernel(DrawKernel):
    """Draws per stream on the worker threads, law per (device, dtype) group."""

    name = "threads"

    @classmethod
    def supports(cls, plan: Plan, restore: RestoreStrategy) -> bool:
        return restore.second_buffer

    def draw_and_apply(self, ctx: DrawContext, strength: float) -> None:
        ctx.run_streams(lambda stream, worker: draw_stream(ctx, stream), cancellable=True)
        apply_law(ctx, strength)
