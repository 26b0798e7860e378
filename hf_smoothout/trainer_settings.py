"""Where a Trainer's SmoothOut settings come from, and the checks they pass before the first step.

`resolve_smoothout_config` takes ``smoothout_config=`` or the arguments' ``smoothout_*`` fields (never both when they
differ), `log_settings_source` says which, `check_trainer_settings` refuses what cannot run (at construction and for
every ``hyperparameter_search`` trial), and `trial_config` applies the ``smoothout_*`` values a trial changed.

Example:
    >>> from types import SimpleNamespace
    >>> from hf_smoothout import SmoothOutConfig
    >>> resolve_smoothout_config(SimpleNamespace(seed=42), SmoothOutConfig(strength=0.02)).seed
    42
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn
from transformers.utils import logging

from .adapters.deepspeed import check_deepspeed
from .arguments import SmoothOutArguments
from .compat import check_trainer_setup
from .config import SmoothOutConfig
from .guards import check_restore_mode
from .selection import select_parameters

logger = logging.get_logger(__name__)


def check_selection(model: nn.Module | None, config: SmoothOutConfig) -> None:
    """Raise ``ValueError`` when an enabled ``config`` selects no trainable parameter of ``model``.

    Example:
        >>> from torch import nn
        >>> try:
        ...     check_selection(nn.Linear(2, 2), SmoothOutConfig(include=["decoder"]))
        ... except ValueError as err:
        ...     print(str(err).split(":")[0])
        SmoothOut selects no trainable parameter
    """
    if model is None or not config.enabled or select_parameters(model, config):
        return
    everything = dataclasses.replace(config, skip_norm_layers=False, skip_bias=False, include=None, exclude=None)
    trainable = len(select_parameters(model, everything))
    named = [name for name, _ in model.named_parameters()]
    frozen_matches = [name for name, p in model.named_parameters() if not p.requires_grad and config.selects_name(name)]
    hint = (
        f" Your patterns only match frozen parameters (e.g. {frozen_matches[0]!r}); frozen parameters never get noise."
        if frozen_matches and len(frozen_matches) == len([n for n in named if config.selects_name(n)])
        else ""
    )
    raise ValueError(
        f"SmoothOut selects no trainable parameter: of the model's {len(named)} parameters ({trainable} trainable), "
        f"none passes include={config.include}, exclude={config.exclude}, skip_norm_layers={config.skip_norm_layers}, "
        f"skip_bias={config.skip_bias}.{hint} Fix the selection, or set smoothout strength 0 to train without noise."
    )


def resolve_smoothout_config(args: Any, smoothout_config: SmoothOutConfig | None) -> SmoothOutConfig:
    """The config to use: explicit ``smoothout_config``, else the one in the ``smoothout_*`` fields of ``args``
    (`SmoothOutArguments`: ``SmoothOutTrainingArguments`` or a config class combined with it), else
    the defaults; the noise seed falls back to ``args.seed``.

    Raises ``ValueError`` when both name different settings.
    """
    from_args = args.to_smoothout_config() if isinstance(args, SmoothOutArguments) else None
    if smoothout_config is None:
        config = from_args if from_args is not None else SmoothOutConfig()
    else:
        if not isinstance(smoothout_config, SmoothOutConfig):
            raise TypeError(f"smoothout_config must be a SmoothOutConfig, got {type(smoothout_config).__name__}.")
        config = smoothout_config
        if from_args is not None:
            explicit = dataclasses.replace(config, seed=config.seed if config.seed is not None else args.seed)
            if explicit.to_dict() != from_args.to_dict():
                raise ValueError(
                    "Both smoothout_config and the arguments' smoothout_* fields were given and they "
                    f"differ ({explicit.to_dict()} vs {from_args.to_dict()}). Pass only one of them."
                )
    if config.seed is None:
        config = dataclasses.replace(config, seed=args.seed)
    return config


def log_settings_source(args: Any, explicit: SmoothOutConfig | None, config: SmoothOutConfig) -> str:
    """Say where the SmoothOut settings came from (and warn when an arguments class without ``smoothout_*``
    fields left them at their defaults); returns the message."""
    if explicit is not None:
        message = f"SmoothOut settings from smoothout_config=: {config.to_dict()}"
    elif isinstance(args, SmoothOutArguments):
        message = f"SmoothOut settings from the {type(args).__name__} smoothout_* fields: {config.to_dict()}"
    else:
        message = (
            f"SmoothOut runs at its default settings (strength {config.strength:g}, adapt={config.adapt!r}): "
            f"{type(args).__name__} has no smoothout_* fields and no smoothout_config= was given, so "
            "--smoothout_* flags cannot reach it. Pass smoothout_config=SmoothOutConfig(...), or combine your "
            "arguments class with hf_smoothout.SmoothOutArguments (@dataclass class MyConfig(SmoothOutArguments, "
            f"{type(args).__name__}))."
        )
        logger.warning(message)
        return message
    logger.info(message)
    return message


def check_trainer_settings(trainer: Any, config: SmoothOutConfig) -> None:
    """Refuse an enabled ``config`` this trainer cannot run: its set-up (`check_trainer_setup`), DeepSpeed's limits,
    the restore for the world size, and a selection without a trainable parameter."""
    if not config.enabled:
        return
    check_trainer_setup(trainer)
    if getattr(trainer, "is_deepspeed_enabled", False):
        check_deepspeed(trainer, config.samples)
        if config.restore == "swap":
            raise ValueError(
                "SmoothOut restore='swap' is not supported with DeepSpeed: its parameters are views into "
                "DeepSpeed's flat buffers, which pointing them at another tensor would cut. Use "
                "restore='copy' (bit-exact, restored before DeepSpeed's optimizer step)."
            )
    check_restore_mode(config, trainer.args.world_size)
    check_selection(trainer.model, config)


def smoothout_fields(args: Any) -> dict[str, Any]:
    """The ``smoothout_*`` values of ``args`` as a config dict (empty for arguments without those fields)."""
    return args.to_smoothout_config().to_dict() if isinstance(args, SmoothOutArguments) else {}


def trial_config(args: Any, config_at_init: SmoothOutConfig, fields_at_init: dict[str, Any]) -> SmoothOutConfig:
    """``config_at_init`` with the ``smoothout_*`` values a ``hyperparameter_search`` trial changed on ``args``.

    Example:
        >>> from hf_smoothout import SmoothOutTrainingArguments
        >>> args = SmoothOutTrainingArguments("out", smoothout_strength=0.01, report_to="none")
        >>> config, fields = args.to_smoothout_config(), smoothout_fields(args)
        >>> args.smoothout_strength = 0.05
        >>> trial_config(args, config, fields).strength
        0.05
    """
    if not isinstance(args, SmoothOutArguments):
        return config_at_init
    changed = {k: v for k, v in smoothout_fields(args).items() if fields_at_init.get(k) != v}
    if changed:
        logger.info(f"SmoothOut: this trial trains with {changed}.")
    return dataclasses.replace(config_at_init, **changed)
