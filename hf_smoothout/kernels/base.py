"""The `DrawKernel` protocol: how one draw's random numbers become noisy weights, and what they share.

A kernel gets a `DrawContext` (the plan, the restore strategy saying where clean and noisy values live, the law,
the draw's key, the placement and the worker threads) and writes ``noisy = clean + tau`` for every slot
(`DrawKernel.draw_and_apply`); an in-place kernel also removes it again by drawing the same numbers
(`DrawKernel.remove`). Every kernel draws the same numbers for the same key (the streams are seeded before it
runs): kernels differ in speed, never in the noise (``tests/test_kernel_contract.py``).

Example:
    >>> from hf_smoothout.kernels import KERNELS
    >>> [k.name for k in KERNELS.values()]
    ['inline', 'threads', 'chunked', 'triton']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from .. import noise

if TYPE_CHECKING:
    from ..laws import NoiseLaw
    from ..placement import Placement
    from ..plan import Plan, Stream
    from ..restore import RestoreStrategy
    from ..seeding import DrawKey
    from ..threads import StreamRunner


@dataclass
class DrawContext:
    """Everything a kernel reads for one draw."""

    plan: Plan
    restore: RestoreStrategy
    law: NoiseLaw
    key: DrawKey
    placement: Placement
    runner: StreamRunner[Stream]

    def run_streams(self, work: Callable[[Stream, int], None], *, cancellable: bool = False) -> None:
        """Run ``work(stream, worker)`` on every stream: CPU streams on the worker threads, balanced by size;
        device and collective streams in this thread (in the same order on every rank).

        Returns or raises only once no worker touches the weights any more (also on Ctrl-C). ``cancellable``: on
        an error or interrupt, skip the streams not yet started.
        """
        streams = self.plan.streams
        cpu = [s for s in streams if s.device.type == "cpu" and not s.collective]
        others = [s for s in streams if s.device.type != "cpu" or s.collective]
        workers = self.plan.workers if cpu else 1
        loads: list[list[Stream]] = [[] for _ in range(workers)]
        sizes = [0] * workers
        for stream in sorted(cpu, key=lambda s: -s.numel):
            i = sizes.index(min(sizes))
            loads[i].append(stream)
            sizes[i] += stream.numel
        self.runner.run([load for load in loads if load], work, inline=others, cancellable=cancellable)


class DrawKernel:
    """Base of every draw-and-apply kernel."""

    name: ClassVar[str]
    in_place: ClassVar[bool] = False
    """True: draws into a scratch and writes the weights in place (restores without a second buffer)."""
    reference_numbers: ClassVar[bool] = True
    """True: draws the reference random numbers (the noise equals any other such kernel's for the same key);
    False: its own counter-based numbers under the same law (checked by the law, not the numbers)."""
    automatic: ClassVar[bool] = True
    """Whether ``kernel="auto"`` may choose it (else only by name)."""

    @classmethod
    def supports(cls, plan: Plan, restore: RestoreStrategy) -> bool:
        """Whether this kernel can run ``plan`` under ``restore``."""
        raise NotImplementedError

    @classmethod
    def why_not(cls, plan: Plan, restore: RestoreStrategy) -> str | None:
        """Why the kernel cannot run ``plan`` under ``restore`` (a short reason), or ``None`` (no reason given)."""
        return None

    def draw_and_apply(self, ctx: DrawContext, strength: float) -> None:
        """Write ``clean + tau`` for every slot (the streams are seeded for ``ctx.key``)."""
        raise NotImplementedError

    def remove(self, ctx: DrawContext, strength: float) -> None:
        """Remove what `draw_and_apply` added by drawing it again (in-place kernels only)."""
        raise NotImplementedError(f"the {self.name!r} kernel keeps the clean weights; it has nothing to redraw")


def seed_streams(plan: Plan, key: DrawKey) -> None:
    """Seed every stream's generator for the draw ``key`` names."""
    for stream in plan.streams:
        stream.generator = key.generator(stream.stream_id, stream.device, stream.dtype, stream.generator)
        stream.chunks_done = 0


def draw_stream(ctx: DrawContext, stream: Stream) -> None:
    """Fill the noisy buffer of every slot of ``stream`` with its raw draw ``u`` (through the placement)."""
    for slot in stream.slots:
        ctx.placement.draw_(slot, ctx.restore.noisy(slot), stream, ctx.key)


def apply_law(ctx: DrawContext, strength: float, draws: Sequence[torch.Tensor] | None = None) -> None:
    """``noisy = clean + multiplier * u`` for every slot, ``u`` being the raw draw in the slot's noisy buffer (or
    ``draws[i]`` for the ``i``-th slot); per-row laws compute their row norms grouped by device and dtype."""
    plan, restore, law = ctx.plan, ctx.restore, ctx.law
    if draws is None:
        u = {id(slot): restore.noisy(slot) for slot in plan.slots}
    else:
        u = {id(slot): d for slot, d in zip(plan.slots, draws, strict=True)}
    if not law.row_scaled:
        for slot in plan.slots:
            law.apply_(restore.noisy(slot), restore.clean(slot), u[id(slot)], strength, row_axis=slot.row_axis)
        return
    for slots in plan.groups:
        if slots and slots[0].reduce_groups:  # rows split across ranks: same order on every rank
            cleans, draws_ = [restore.clean(slot) for slot in slots], [u[id(slot)] for slot in slots]
            scales = ctx.placement.split_row_scales(slots, cleans, draws_, strength, normalize=law.normalizes_draw)
            for slot, clean, draw, scale in zip(slots, cleans, draws_, scales, strict=True):
                torch.addcmul(clean, draw, scale, out=restore.noisy(slot))
            continue
        scales = law.row_scales_(
            [restore.clean(slot) for slot in slots],
            [u[id(slot)] for slot in slots],
            strength,
            [slot.row_axis for slot in slots],
            [slot.norms for slot in slots],  # type: ignore[misc]
        )
        for slot, scale in zip(slots, scales, strict=True):
            torch.addcmul(restore.clean(slot), u[id(slot)], scale, out=restore.noisy(slot))


def draw_raw_(out: torch.Tensor, distribution: str, generator: object) -> None:
    """`hf_smoothout.noise.draw_`, looked up at call time (one place to intercept every kernel's draws)."""
    noise.draw_(out, distribution, generator)  # type: ignore[arg-type]
