"""``restore="copy"``: back the clean weights up before the draw, copy them back after (bit-exact, any storage).

Example:
    >>> from torch import nn
    >>> from hf_smoothout import SmoothOut, SmoothOutConfig
    >>> SmoothOut(nn.Linear(2, 2), SmoothOutConfig(restore="copy")).restore_mode
    'copy'
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch

from ..plan import Plan, Slot
from .base import RestoreStrategy


class CopyRestore(RestoreStrategy):
    """The noise is written into the weights; the clean values wait in the second buffer."""

    name = "copy"
    second_buffer = True
    exact = True

    def clean(self, slot: Slot) -> torch.Tensor:
        return slot.backup  # type: ignore[return-value]

    def before_draw(self, plan: Plan) -> None:
        for params, backups in plan.pairs:
            torch._foreach_copy_(backups, params)

    def take_out(self, plan: Plan, moved: Collection[int], *, keep: bool, redraw: Callable[[], None]) -> bool:
        kept = keep and not moved
        if kept and plan.slots:  # the noisy values go to one more buffer per weight, allocated at the first suspend
            held = [_held_buffer(slot) for slot in plan.slots]
            torch._foreach_copy_(held, [s.data for s in plan.slots])
        for params, backups in plan.pairs:
            torch._foreach_copy_(params, backups)
        return kept

    def put_back(self, plan: Plan) -> None:
        if plan.slots:
            torch._foreach_copy_([s.data for s in plan.slots], [s.held for s in plan.slots])  # type: ignore[misc]


def _held_buffer(slot: Slot) -> torch.Tensor:
    if slot.held is None or slot.held.shape != slot.data.shape or slot.held.dtype != slot.data.dtype:
        slot.held = torch.empty_like(slot.data, memory_format=torch.contiguous_format)
    return slot.held
