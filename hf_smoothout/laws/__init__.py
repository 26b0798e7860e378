"""Noise laws: a registry of `NoiseLaw` objects, one file each, used by the engine and the merged space alike.

Adding a law: a file with a `NoiseLaw` (or `RowScaledLaw`) subclass and one line in `NOISE_LAWS`; the contract
suite (``tests/test_noise_law_contract.py``) runs against everything registered, and ``SmoothOutConfig.adapt``
accepts the new name.

Example:
    >>> sorted(NOISE_LAWS)
    ['filter', 'filter_std', 'none', 'weight']
    >>> get_noise_law("filter").row_scaled
    True
"""

from __future__ import annotations

from .base import NoiseLaw, RowScaledLaw, mean_abs_draw
from .filter import FilterLaw
from .filter_std import FilterStdLaw
from .none import NoneLaw
from .weight import WeightLaw

NOISE_LAWS: dict[str, NoiseLaw] = {law.name: law for law in (FilterLaw(), FilterStdLaw(), NoneLaw(), WeightLaw())}
"""Every registered law by its ``adapt`` name."""


def get_noise_law(name: str) -> NoiseLaw:
    """The law registered as ``name`` (``SmoothOutConfig.adapt``); ``ValueError`` names the registered ones."""
    try:
        return NOISE_LAWS[name]
    except KeyError:
        raise ValueError(f"Unknown adapt mode {name!r}; allowed: {', '.join(sorted(NOISE_LAWS))}.") from None


def list_noise_laws() -> list[str]:
    """The registered law names, sorted."""
    return sorted(NOISE_LAWS)


__all__ = [
    "NOISE_LAWS",
    "NoiseLaw",
    "RowScaledLaw",
    "get_noise_law",
    "list_noise_laws",
    "mean_abs_draw",
]
