"""``restore="regenerate"``: no second buffer; the noise is drawn again from the same key and subtracted (equal to
the clean weights up to rounding; a single process only, see `hf_smoothout.guards.check_restore_mode`).

Example:
    >>> from torch import nn
    >>> from hf_smoothout import SmoothOut, SmoothOutConfig
    >>> SmoothOut(nn.Linear(2, 2), SmoothOutConfig(restore="regenerate")).restore_mode
    'regenerate'
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from ..plan import Plan
from .base import RestoreStrategy


class RegenerateRestore(RestoreStrategy):
    """The noise is drawn into the weights chunk by chunk and removed the same way."""

    name = "regenerate"

    def take_out(self, plan: Plan, moved: Collection[int], *, keep: bool, redraw: Callable[[], None]) -> bool:
        redraw()
        return False
