"""The `RestoreStrategy` protocol: where the clean and the noisy values live while the window is open, and how the
weights get clean again.

A strategy is asked, around one draw: ``clean(slot)`` / ``noisy(slot)`` (where the kernel reads the clean values
and writes the noisy ones), ``before_draw`` (copy: back the weights up), ``after_apply`` (swap: point the
parameters at the noisy buffers), ``expected(slot)`` (the storage a parameter must still be on while noisy: a
wrapper that moved it is detected against this), ``take_out`` (make the weights clean; ``keep`` asks to keep the
noisy values for a `put_back` without a new draw, and it returns whether it did) and ``put_back``.

Example:
    >>> from hf_smoothout.restore import get_restore_strategy
    >>> s = get_restore_strategy("copy")
    >>> s.second_buffer, s.exact, s.removes_noise
    (True, True, True)
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import ClassVar

import torch

from ..plan import Plan, Slot


class RestoreStrategy:
    """Base of every restore strategy: the noise is written into the weights themselves and nothing is kept."""

    name: ClassVar[str]
    second_buffer: ClassVar[bool] = False
    """Whether the plan keeps one more tensor per weight (the clean values, or the noisy ones)."""
    exact: ClassVar[bool] = False
    """Whether the weights come back bit-identical to before the draw."""
    removes_noise: ClassVar[bool] = True
    """False only for ``denoise=False``: the noise stays in the weights by design."""

    def clean(self, slot: Slot) -> torch.Tensor:
        """Where the clean values are while the weights are noisy."""
        return slot.data

    def noisy(self, slot: Slot) -> torch.Tensor:
        """Where the noisy values are written (and raw draws land before that)."""
        return slot.data

    def expected(self, slot: Slot) -> torch.Tensor:
        """The storage ``slot``'s parameter must be on while noisy."""
        return slot.data

    def before_draw(self, plan: Plan) -> None:
        """Called once the noise is about to be written (copy: back the clean values up)."""

    def after_apply(self, plan: Plan) -> None:
        """Called once the noisy values are written (swap: point the parameters at them)."""

    def take_out(self, plan: Plan, moved: Collection[int], *, keep: bool, redraw: Callable[[], None]) -> bool:
        """Make the weights of every slot not in ``moved`` (``id(slot)``) clean; ``redraw`` removes the noise by
        drawing it again. Returns whether the noisy values were kept for `put_back`."""
        raise NotImplementedError

    def put_back(self, plan: Plan) -> None:
        """Put the noisy values kept by ``take_out(keep=True)`` back (only called after it returned True)."""
        raise NotImplementedError
