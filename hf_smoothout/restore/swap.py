"""``restore="swap"``: write the noisy weights into a second buffer and point each parameter at it for the forward
and backward pass, then back at its untouched clean tensor (bit-exact, two copy passes fewer than copy).

Only where that is proven harmless (`hf_smoothout.restore.auto`): plain CPU tensors owning their whole storage.

Example:
    >>> import torch
    >>> from hf_smoothout import SmoothOut, SmoothOutConfig
    >>> layer = torch.nn.Linear(2, 2); clean = layer.weight.data_ptr()
    >>> with SmoothOut(layer, SmoothOutConfig(restore="swap", strength=0.1)).perturbed():
    ...     layer.weight.data_ptr() == clean  # the parameter points at the noisy buffer meanwhile
    False
    >>> layer.weight.data_ptr() == clean
    True
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch

from ..plan import Plan, Slot
from .base import RestoreStrategy


class SwapRestore(RestoreStrategy):
    """The clean tensors are never written; the parameters point at the noisy buffers while noisy."""

    name = "swap"
    second_buffer = True
    exact = True

    def __init__(self) -> None:
        self.pointed = False  # the parameters point at the noisy buffers

    def noisy(self, slot: Slot) -> torch.Tensor:
        return slot.backup  # type: ignore[return-value]

    def expected(self, slot: Slot) -> torch.Tensor:
        return slot.backup if self.pointed else slot.data  # type: ignore[return-value]

    def after_apply(self, plan: Plan) -> None:
        self._point_at_noisy(plan)

    def take_out(self, plan: Plan, moved: Collection[int], *, keep: bool, redraw: Callable[[], None]) -> bool:
        for slot in plan.slots:  # back at the untouched clean tensors; the noisy ones stay in the second buffers
            if id(slot) not in moved:
                slot.param.data = slot.data
        self.pointed = False
        return keep and not moved

    def put_back(self, plan: Plan) -> None:
        self._point_at_noisy(plan)

    def _point_at_noisy(self, plan: Plan) -> None:
        for slot in plan.slots:
            slot.param.data = slot.backup  # type: ignore[assignment]
        self.pointed = True
