"""Chunked in place: no second buffer (``restore="regenerate"``, ``denoise=False``). Each stream draws whole-row
chunks into a small scratch per worker and adds them to the weights; `remove` draws the same chunks again and
subtracts them.

Example:
    >>> from hf_smoothout.kernels import KERNELS
    >>> KERNELS["chunked"].in_place
    True
"""

from __future__ import annotations

from ..plan import Plan, Stream, chunks
from ..restore import RestoreStrategy
from .base import DrawContext, DrawKernel, draw_raw_


class ChunkedKernel(DrawKernel):
    """Scratch-sized chunks of whole rows, drawn and added in place on the worker threads."""

    name = "chunked"
    in_place = True

    @classmethod
    def supports(cls, plan: Plan, restore: RestoreStrategy) -> bool:
        return not restore.second_buffer

    def draw_and_apply(self, ctx: DrawContext, strength: float) -> None:
        def add(stream: Stream, worker: int) -> None:
            scratch = ctx.plan.scratch[(stream.device, stream.dtype)][worker]
            for slot, weight, draw, norms in chunks(stream, scratch):
                draw_raw_(draw, ctx.key.distribution, stream.generator)
                ctx.law.apply_(weight, weight, draw, strength, row_axis=slot.row_axis, buffers=norms)
                stream.chunks_done += 1

        ctx.run_streams(add, cancellable=True)

    def remove(self, ctx: DrawContext, strength: float) -> None:
        def subtract(stream: Stream, worker: int) -> None:
            stream.generator = ctx.key.generator(stream.stream_id, stream.device, stream.dtype, stream.generator)
            scratch = ctx.plan.scratch[(stream.device, stream.dtype)][worker]
            remaining = stream.chunks_done  # a perturb that failed midway added only these chunks
            for _slot, weight, draw, norms in chunks(stream, scratch):
                if remaining == 0:
                    break
                draw_raw_(draw, ctx.key.distribution, stream.generator)
                ctx.law.remove_(weight, draw, strength, row_scale=None if norms is None else norms[0])
                remaining -= 1
            stream.chunks_done = 0

        ctx.run_streams(subtract)
