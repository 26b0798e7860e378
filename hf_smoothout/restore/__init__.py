"""Restore strategies: how the weights get clean after the loss's backward pass, one file each, behind the
`RestoreStrategy` protocol (``base.py``), and ``"auto"``'s choice between them (``auto.py``).

Adding one: a file with a `RestoreStrategy` subclass and one line in `RESTORE_STRATEGIES`;
``tests/test_restore_contract.py`` runs against everything registered and ``SmoothOutConfig.restore`` accepts it.

Example:
    >>> sorted(RESTORE_STRATEGIES)
    ['copy', 'regenerate', 'swap']
    >>> strategy_for("auto", denoise=False).name
    'keep'
"""

from __future__ import annotations

from .auto import EXACT_RESTORES, resolve_restore, swap_blocker
from .base import RestoreStrategy
from .copy import CopyRestore
from .keep import KeepNoise
from .regenerate import RegenerateRestore
from .swap import SwapRestore

RESTORE_STRATEGIES: dict[str, type[RestoreStrategy]] = {
    cls.name: cls for cls in (CopyRestore, RegenerateRestore, SwapRestore)
}
"""Every registered restore by its ``SmoothOutConfig.restore`` name (``"auto"`` picks one of them)."""


def get_restore_strategy(name: str) -> RestoreStrategy:
    """A new instance of the strategy registered as ``name``."""
    try:
        return RESTORE_STRATEGIES[name]()
    except KeyError:
        raise ValueError(f"Unknown restore {name!r}; registered: {', '.join(sorted(RESTORE_STRATEGIES))}.") from None


def strategy_for(resolved: str, *, denoise: bool) -> RestoreStrategy:
    """The strategy an engine runs: ``resolved`` (``config.restore`` with ``"auto"`` decided), or `KeepNoise` when
    ``denoise`` is off."""
    return get_restore_strategy(resolved) if denoise else KeepNoise()


__all__ = [
    "EXACT_RESTORES",
    "RESTORE_STRATEGIES",
    "RestoreStrategy",
    "get_restore_strategy",
    "resolve_restore",
    "strategy_for",
    "swap_blocker",
]
