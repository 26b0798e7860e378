"""Draw-and-apply kernels: how one draw becomes noisy weights, one file each, behind the `DrawKernel` protocol.

`select_kernel` takes the first registered kernel that supports the plan and the restore strategy (or the one
asked for by name, refused with the reason when it cannot run). Adding one (a fused GPU kernel, ...): a file with a
`DrawKernel` subclass and one line in `KERNELS`; ``tests/test_kernel_contract.py`` checks that every registered
kernel draws the same noise as the reference for every law, distribution and restore it supports.

Example:
    >>> list(KERNELS)
    ['inline', 'threads', 'chunked', 'triton']
"""

from __future__ import annotations

from ..plan import Plan
from ..restore import RestoreStrategy
from .base import DrawContext, DrawKernel, apply_law, seed_streams
from .chunked import ChunkedKernel
from .inline import InlineKernel
from .threads import ThreadsKernel
from .triton_fused import TritonKernel

KERNELS: dict[str, type[DrawKernel]] = {
    cls.name: cls for cls in (InlineKernel, ThreadsKernel, ChunkedKernel, TritonKernel)
}
"""Every registered kernel by name, in the order `select_kernel` tries them (the fastest that applies first)."""


def select_kernel(plan: Plan, restore: RestoreStrategy, requested: str | None = None) -> DrawKernel:
    """The kernel that runs ``plan`` under ``restore``: ``requested`` by name, or the first that supports it."""
    if requested is not None:
        if requested not in KERNELS:
            raise ValueError(f"Unknown kernel {requested!r}; registered: {', '.join(KERNELS)}.")
        if not KERNELS[requested].supports(plan, restore):
            why = KERNELS[requested].why_not(plan, restore)
            raise ValueError(
                f"SmoothOut: the {requested!r} kernel cannot run restore={restore.name!r} on these parameters "
                f"({why or f'workers={plan.workers}, devices={sorted({s.device.type for s in plan.streams})}'}); "
                "leave kernel unset (or 'auto') to let the engine choose."
            )
        return KERNELS[requested]()
    for cls in KERNELS.values():
        if cls.automatic and cls.supports(plan, restore):
            return cls()
    raise AssertionError("the threads and chunked kernels cover every restore")  # pragma: no cover


__all__ = ["KERNELS", "DrawContext", "DrawKernel", "apply_law", "seed_streams", "select_kernel"]
