"""``denoise=False`` (the no-de-noising ablation): the noise is drawn into the weights and stays there.

Not a user-facing restore (``SmoothOutConfig.restore`` keeps its value); the engine runs it whenever ``denoise`` is
off.

Example:
    >>> KeepNoise().removes_noise
    False
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from ..plan import Plan
from .base import RestoreStrategy


class KeepNoise(RestoreStrategy):
    """Nothing to undo."""

    name = "keep"
    removes_noise = False

    def take_out(self, plan: Plan, moved: Collection[int], *, keep: bool, redraw: Callable[[], None]) -> bool:
        return False
