"""Noise-strength schedules: the coefficient ``coef(t)`` that multiplies the strength ``a``.

``t`` is the optimizer step (0-based, the Trainer's ``global_step``) and ``T`` the total number
of optimizer steps.

Example:
    >>> round(noise_coefficient("anneal", step=3, anneal_index=0.55), 6)
    0.68302
    >>> noise_coefficient("tanh", step=50, total_steps=100)
    0.5
    >>> noise_coefficient("cosine", step=25, total_steps=100) == (1 - math.cos(math.pi / 4)) / 2
    True
"""

from __future__ import annotations

import math


def constant_coefficient() -> float:
    """The ``constant`` schedule: always 1."""
    return 1.0


def anneal_coefficient(step: int, anneal_index: float = 0.55) -> float:
    """The ``anneal`` schedule: ``(1 + t) ** (-anneal_index / 2)``, decaying from 1."""
    return (1.0 + step) ** (-anneal_index / 2.0)


def tanh_coefficient(step: int, total_steps: int, tanh_scale: float = 10.0) -> float:
    """The ``tanh`` schedule: ``(tanh(s * (t / T - 0.5)) + 1) / 2``, ramping the noise up over training."""
    return (math.tanh(tanh_scale * (step / total_steps - 0.5)) + 1.0) / 2.0


def cosine_coefficient(step: int, total_steps: int) -> float:
    """The ``cosine`` schedule: ``(1 - cos(pi * t / T)) / 2``, ramping the noise up from 0 to 1 (Flat-LoRA)."""
    return (1.0 - math.cos(math.pi * min(step, total_steps) / total_steps)) / 2.0


def noise_coefficient(
    schedule: str,
    step: int,
    total_steps: int | None = None,
    *,
    anneal_index: float = 0.55,
    tanh_scale: float = 10.0,
) -> float:
    """Value of ``schedule`` at optimizer step ``step`` of ``total_steps``.

    Raises:
        ValueError: for an unknown schedule, a negative step, or ``"tanh"``/``"cosine"`` without a
            positive ``total_steps``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    if schedule == "constant":
        return constant_coefficient()
    if schedule == "anneal":
        return anneal_coefficient(step, anneal_index)
    if schedule in ("tanh", "cosine"):
        if total_steps is None or total_steps <= 0:
            raise ValueError(
                f"The {schedule!r} schedule needs total_steps > 0 (the number of optimizer steps of the run); "
                f"got total_steps={total_steps!r}."
            )
        if schedule == "cosine":
            return cosine_coefficient(step, total_steps)
        return tanh_coefficient(step, total_steps, tanh_scale)
    raise ValueError(f"Unknown schedule {schedule!r}; allowed: constant, anneal, tanh, cosine.")
