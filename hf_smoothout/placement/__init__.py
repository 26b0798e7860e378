"""Placements: how a back-end stores the selected parameters, one file each, behind the `Placement` protocol.

`detect_placement` picks, in registry order, the first placement that applies to the model (FSDP2 shards, ZeRO-3
flat slices, DeepSpeed ZeRO-1/2 flat groups, then plain tensors). Adding one: a file with a `Placement` subclass and
one line in `PLACEMENTS`; ``tests/test_placement_contract.py`` runs against everything registered.

Example:
    >>> from torch import nn
    >>> list(PLACEMENTS)
    ['fsdp2', 'zero3', 'deepspeed', 'local']
    >>> detect_placement(nn.Linear(2, 2), []).name
    'local'
"""

from __future__ import annotations

from torch import nn

from ..selection import SelectedParameter
from .base import Placement
from .deepspeed import DeepSpeedPlacement
from .fsdp2 import FSDP2Placement
from .local import LocalPlacement
from .zero3 import Zero3Placement

PLACEMENTS: dict[str, type[Placement]] = {
    cls.name: cls for cls in (FSDP2Placement, Zero3Placement, DeepSpeedPlacement, LocalPlacement)
}
"""Every registered placement by name, in the order `detect_placement` tries them (the most specific first)."""


def get_placement(name: str, rank: int = 0, world_size: int = 1) -> Placement:
    """The placement registered as ``name``, for this rank and world size."""
    try:
        return PLACEMENTS[name](rank, world_size)
    except KeyError:
        raise ValueError(f"Unknown placement {name!r}; registered: {', '.join(PLACEMENTS)}.") from None


def detect_placement(
    model: nn.Module, selected: list[SelectedParameter], rank: int = 0, world_size: int = 1
) -> Placement:
    """The first registered placement that applies to ``model``'s ``selected`` parameters."""
    for cls in PLACEMENTS.values():
        if cls.applies(model, selected):
            return cls(rank, world_size)
    raise AssertionError("the local placement applies to every model")  # pragma: no cover


__all__ = ["PLACEMENTS", "Placement", "detect_placement", "get_placement"]
