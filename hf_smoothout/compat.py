"""Trainer set-ups SmoothOut refuses, and the mixed-precision resolution warning.

Anything that changes the weights *inside* ``training_step`` would be undone (or corrupted) by
the restore that follows the backward pass, so it is refused at construction with a message.

Example:
    >>> from types import SimpleNamespace
    >>> trainer = SimpleNamespace(args=SimpleNamespace(optim="lomo"), is_deepspeed_enabled=False,
    ...                           is_fsdp_enabled=False)
    >>> try:
    ...     check_trainer_setup(trainer)
    ... except ValueError as err:
    ...     print(str(err).split(":")[0])
    SmoothOut cannot run with optim='lomo'
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .config import SmoothOutConfig
from .noise import typical_relative_noise

# Optimizers that update the weights during backward (inside `training_step`).
_IN_BACKWARD_OPTIMIZERS = ("lomo", "adalomo")
_LAYERWISE_SUFFIX = "_layerwise"

# Unit roundoff of the low-precision float formats the forward pass may run in.
_UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def check_trainer_setup(trainer: Any) -> None:
    """Raise ``ValueError`` for set-ups where restoring after ``training_step`` would corrupt weights."""
    optim = str(getattr(trainer.args, "optim", ""))
    optim = getattr(trainer.args.optim, "value", optim)
    if optim in _IN_BACKWARD_OPTIMIZERS or optim.endswith(_LAYERWISE_SUFFIX):
        raise ValueError(
            f"SmoothOut cannot run with optim={optim!r}: this optimizer updates the weights during the backward "
            "pass, inside training_step, so removing the noise afterwards would undo or corrupt the update. "
            "Use a regular optimizer (e.g. adamw_torch, sgd, or the non-layerwise GaLore/APOLLO variant)."
        )
    if getattr(trainer, "is_fsdp_enabled", False) and fsdp_version(trainer) != 2:
        raise ValueError(
            "SmoothOut does not support FSDP1 (accelerate's FSDP plugin with fsdp_version 1): it flattens the "
            "parameters, so a weight's rows are split anywhere and can be neither scaled per row nor restored per "
            "row. Use FSDP2 (fsdp_config={'version': 2}, the default in transformers, or fsdp_version: 2 in the "
            "accelerate config), which shards each weight along its rows."
        )


def fsdp_version(trainer: Any) -> int | None:
    """The FSDP version of ``trainer``'s accelerate FSDP plugin (1 or 2), or ``None`` without one."""
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "fsdp_plugin", None)
    return None if plugin is None else int(getattr(plugin, "fsdp_version", 1))


def warn_if_below_resolution(config: SmoothOutConfig, params: list[torch.Tensor], compute_dtype: torch.dtype) -> bool:
    """Warn when most noise would be rounded away in ``compute_dtype`` (bf16/fp16). Returns whether it warned."""
    roundoff = _UNIT_ROUNDOFF.get(compute_dtype)
    if roundoff is None or not config.enabled:
        return False
    relative = typical_relative_noise(config, params)
    if relative >= roundoff:
        return False
    warnings.warn(
        f"SmoothOut noise of typical relative size {relative:.2e} is below the {compute_dtype} resolution of the "
        f"weights ({roundoff:.2e}): under {compute_dtype} most perturbed weights round back to their clean value "
        "and the method has little effect. Raise smoothout strength, or train in fp32.",
        UserWarning,
        stacklevel=3,
    )
    return True


def forward_compute_dtype(trainer: Any) -> torch.dtype | None:
    """The autocast dtype a Trainer's forward really runs in (accelerate ignores fp16 on CPU), else ``None``.

    Example:
        >>> from types import SimpleNamespace
        >>> args = SimpleNamespace(bf16=True, fp16=False)
        >>> forward_compute_dtype(SimpleNamespace(args=args))
        torch.bfloat16
    """
    accelerator = getattr(trainer, "accelerator", None)
    mixed = str(getattr(accelerator, "mixed_precision", "no")) if accelerator is not None else "no"
    if mixed == "no" and accelerator is None:
        mixed = "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "no"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed)
    if dtype is not None and accelerator is not None and not getattr(accelerator, "native_amp", True):
        if not getattr(trainer, "_smoothout_told_no_amp", False):
            warnings.warn(
                f"mixed precision {mixed!r} is not active on {trainer.args.device.type} (accelerate runs the forward "
                "in the parameters' dtype there), so SmoothOut's noise is not rounded to it.",
                UserWarning,
                stacklevel=2,
            )
            trainer._smoothout_told_no_amp = True
        return None
    return dtype
