"""Plain tensors: one process, or DDP's whole replicas (each rank perturbs its own copy).

Example:
    >>> from torch import nn
    >>> LocalPlacement.applies(nn.Linear(2, 2), [])
    True
"""

from __future__ import annotations

from .base import Placement


class LocalPlacement(Placement):
    """Every selected parameter is a plain tensor holding all its values on this rank."""

    name = "local"
