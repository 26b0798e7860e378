"""The non-finite loss check of a Trainer step: a loss that is finite at the clean weights must stay finite at the
noisy ones, else the noise is far too strong and training stops with a message that says so.

Checked every micro-batch when ``logging_nan_inf_filter`` is on (the Trainer reads the loss on the host then anyway,
so the check adds no synchronization), else at each new peak strength. The clean loss (one more forward, no
gradient, after the window is closed or suspended) is computed only when the noisy one is not finite.

Example:
    >>> import torch
    >>> check = NoisyLossCheck()
    >>> check(torch.tensor(0.7), strength=0.01, every_step=False, clean_loss=None, adapt="filter", step=0)
    >>> check.checked_strength
    0.01
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.utils import logging

from .noise import NonFiniteNoiseError

logger = logging.get_logger(__name__)

# Without logging_nan_inf_filter, the loss at the noisy weights is checked at the first step and whenever the
# effective strength exceeds this factor times the last checked one.
LOSS_CHECK_GROWTH = 2.0


class NoisyLossCheck:
    """Refuse a non-finite loss at the noisy weights when the loss at the clean weights is finite."""

    def __init__(self) -> None:
        self.checked_strength = 0.0  # largest strength whose noisy loss was finite
        self.told_diverged = False

    def reset(self) -> None:
        """Check again from the first step (a ``hyperparameter_search`` trial's own strengths)."""
        self.checked_strength, self.told_diverged = 0.0, False

    def __call__(
        self,
        loss: torch.Tensor,
        *,
        strength: float,
        every_step: bool,
        clean_loss: Callable[[], torch.Tensor] | None,
        adapt: str,
        step: int,
    ) -> None:
        """Check ``loss`` (at the noisy weights, drawn at ``strength``); ``clean_loss`` computes it at the clean
        weights (``None``: no inputs to recompute it on, nothing is refused)."""
        if not every_step and strength <= LOSS_CHECK_GROWTH * self.checked_strength:
            return
        if bool(torch.isfinite(loss.detach()).all()):
            self.checked_strength = max(self.checked_strength, strength)
            return
        if clean_loss is None:
            return
        with torch.no_grad():
            clean = clean_loss()
        if bool(torch.isfinite(clean.detach()).all()):
            raise NonFiniteNoiseError(
                f"SmoothOut: the loss at the noisy weights is {loss.item()} while the clean loss is {clean.item():.4g} "
                f"(strength {strength:g}, adapt={adapt!r}): the noise is far too strong for this model. Lower "
                "smoothout strength (typical: 1e-3 to 5e-2 with adapt='filter'). The weights are clean."
            )
        if not self.told_diverged:
            self.told_diverged = True
            logger.warning(
                f"The loss is non-finite at the clean weights too (step {step}): training has diverged, and the "
                "Trainer's logging_nan_inf_filter keeps it out of the logged loss. If it began with SmoothOut, lower "
                "smoothout strength."
            )
