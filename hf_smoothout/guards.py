"""Checks the engine runs on its inputs and state: refusals with a message that says what to do, and warnings.

Example:
    >>> from torch import nn
    >>> from hf_smoothout import SmoothOutConfig
    >>> check_restore_mode(SmoothOutConfig(restore="regenerate"), world_size=1)  # fine in one process
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .config import SmoothOutConfig
from .laws import get_noise_law
from .noise import typical_relative_noise
from .selection import SelectedParameter

_SEED_LIMIT = 2**64


def module_tensor_attributes(model: nn.Module) -> list[torch.Tensor]:
    """Tensors the model's modules hold as plain attributes (neither parameter nor buffer), directly or in a list,
    tuple or dict: ``self.w_t = self.lin.weight.data.t()`` keeps an alias of a weight that ``model.parameters()``
    does not show (the ``"auto"`` restore copies rather than swaps such a weight).

    Example:
        >>> from torch import nn
        >>> layer = nn.Linear(2, 2)
        >>> layer.w_t = layer.weight.data.t()
        >>> [t.shape for t in module_tensor_attributes(layer)]
        [torch.Size([2, 2])]
    """
    found: list[torch.Tensor] = []
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, dict):
                items = list(value.values())
            else:
                items = list(value) if isinstance(value, (list, tuple)) else [value]
            found.extend(v for v in items if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter))
    return found


def check_no_forward_writes(selected: list[SelectedParameter]) -> None:
    """Refuse selected weights that their own forward pass rewrites: ``nn.Embedding(max_norm=...)`` renormalizes
    the rows it looks up in place, which the restore after the backward pass would undo.

    Example:
        >>> from torch import nn
        >>> from hf_smoothout.selection import select_parameters
        >>> try:
        ...     check_no_forward_writes(select_parameters(nn.Embedding(4, 2, max_norm=1.0), SmoothOutConfig()))
        ... except ValueError as err:
        ...     print(str(err)[:60])
        SmoothOut: 'weight' belongs to nn.Embedding(max_norm=1), who
    """
    for sel in selected:
        if isinstance(sel.module, nn.Embedding) and sel.module.max_norm is not None:
            raise ValueError(
                f"SmoothOut: {sel.name!r} belongs to nn.Embedding(max_norm={sel.module.max_norm:g}), whose forward "
                "renormalizes the looked-up rows in place; restoring the clean weights after the backward pass would "
                "undo that. Leave it out with config.exclude (e.g. exclude=[...embedding name...]), or set "
                "max_norm=None."
            )


def check_restore_mode(config: SmoothOutConfig, world_size: int) -> None:
    """Raise ``ValueError`` when ``config.restore`` cannot keep data-parallel replicas identical.

    Example:
        >>> check_restore_mode(SmoothOutConfig(restore="regenerate"), world_size=1)
    """
    if config.restore == "regenerate" and config.denoise and config.independent_ranks and world_size > 1:
        raise ValueError(
            "restore='regenerate' is refused when ranks draw different noise (independent_ranks=True with "
            f"world_size={world_size}): its rounding drift differs per rank and data-parallel replicas "
            "would diverge for good. Use restore='copy' (bit-exact), or independent_ranks=False."
        )


def warn_if_implausible_strength(config: SmoothOutConfig, params: list[torch.Tensor]) -> bool:
    """Warn when one draw's noise would typically be larger than the weights themselves. Returns whether it warned.

    Example:
        >>> import torch
        >>> warn_if_implausible_strength(SmoothOutConfig(strength=0.01), [torch.ones(3, 3)])
        False
    """
    if not config.enabled or not params:
        return False
    if get_noise_law(config.adapt).relative:
        implausible, what = config.strength > 1.0, f"strength {config.strength:g} > 1 with adapt={config.adapt!r}"
    else:
        relative = typical_relative_noise(config, params)
        implausible, what = relative > 1.0, f"typical |noise| / |weight| of {relative:.3g} with adapt='none'"
    if implausible:
        warnings.warn(
            f"SmoothOut: {what}: the noise is larger than the weights it perturbs, which destroys what the model "
            "computes. Typical strengths are 1e-3 to 5e-2 (adapt='filter' or 'weight'), or about 1e-4 to 1e-2 "
            "for adapt='none' (an absolute box, compare it with your weights' scale).",
            UserWarning,
            stacklevel=3,
        )
    return implausible


def validate_state(state: Any) -> None:
    """Raise ``ValueError`` unless ``state`` is a SmoothOut noise state (as `SmoothOut.state_dict` returns).

    Example:
        >>> validate_state({"base_seed": 1, "draws": -2})
        Traceback (most recent call last):
        ...
        ValueError: Not a valid SmoothOut state: draws=-2 (must be an integer >= 0).
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"Not a SmoothOut state: expected a dict, got {type(state).__name__}.")
    missing = {"base_seed", "draws"} - set(state)
    if missing:
        raise ValueError(f"Not a SmoothOut state: missing {sorted(missing)}.")
    for name, limit in (("base_seed", _SEED_LIMIT), ("draws", None)):
        value = state[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (limit and value >= limit):
            raise ValueError(
                f"Not a valid SmoothOut state: {name}={value!r} (must be an integer >= 0"
                f"{' and < 2**64' if limit else ''})."
            )
