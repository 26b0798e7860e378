"""Which engine currently holds noise in which parameter: one perturbation at a time per parameter.

Two engines that perturb the same weights must not overlap: restoring them out of order writes the
other engine's noisy values back as "clean" ones. Every perturb claims its parameters here and every
restore releases them; a claim on a parameter that another live engine holds is refused before any
weight is touched.

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> class Engine: ...
    >>> a, b = Engine(), Engine()
    >>> claim([("w", w)], a)
    >>> try:
    ...     claim([("w", w)], b)
    ... except RuntimeError as err:
    ...     print(str(err).split(":")[0])
    Parameter 'w' is already perturbed by another SmoothOut engine
    >>> release([w], a); claim([("w", w)], b); release([w], b)
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from typing import Any

import torch

_lock = threading.Lock()
# id(parameter) -> (weak reference to the parameter, weak reference to the owning engine)
_owners: dict[int, tuple[weakref.ref[torch.Tensor], weakref.ref[Any]]] = {}


def _live_owner(param: torch.Tensor) -> Any | None:
    entry = _owners.get(id(param))
    if entry is None:
        return None
    param_ref, owner_ref = entry
    owner = owner_ref()
    if param_ref() is not param or owner is None:  # a dead entry (object gone, id reused)
        del _owners[id(param)]
        return None
    return owner


def claim(named_params: Iterable[tuple[str, torch.Tensor]], owner: Any) -> None:
    """Mark every parameter as perturbed by ``owner``; refuses (claiming nothing) if another owner holds one."""
    named = list(named_params)
    with _lock:
        for name, param in named:
            holder = _live_owner(param)
            if holder is not None and holder is not owner:
                raise RuntimeError(
                    f"Parameter {name!r} is already perturbed by another SmoothOut engine: two engines must not "
                    "hold noise in the same weights at once (restoring them out of order would write noisy "
                    "values back as clean ones). Call restore() on the other engine first, or use one engine "
                    "(config.samples for several noisy copies)."
                )
        owner_ref = weakref.ref(owner)
        for _, param in named:
            _owners[id(param)] = (weakref.ref(param), owner_ref)


def release(params: Iterable[torch.Tensor], owner: Any) -> None:
    """Drop ``owner``'s claims on ``params`` (claims of other owners are left alone)."""
    with _lock:
        for param in params:
            if _live_owner(param) is owner:
                del _owners[id(param)]


def owner_of(param: torch.Tensor) -> Any | None:
    """The engine that holds noise in ``param`` right now, or ``None``."""
    with _lock:
        return _live_owner(param)
