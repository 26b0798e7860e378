"""Effective batch size and the large-batch learning-rate rule.

effective batch ``B`` = per-device batch x gradient accumulation x processes. The authors' script
scales the learning rate as ``lr * (B / b0) ** 0.5`` (``sqrt``, default there) or linearly, with
``b0`` a reference batch size.

Example:
    >>> plan = plan_batch(per_device=64, accumulation=4, world_size=2, learning_rate=0.1,
    ...                   lr_scaling="sqrt", reference_batch_size=128)
    >>> plan.effective, round(plan.learning_rate, 4)
    (512, 0.2)
    >>> scale_learning_rate(0.1, 512, 128, "linear")
    0.4
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .errors import RecipeError

LR_SCALING_POWERS = {"sqrt": 0.5, "linear": 1.0, "none": 0.0}
LR_SCALING_RULES = tuple(LR_SCALING_POWERS)


def scale_learning_rate(learning_rate: float, batch: int, reference_batch: int | None, rule: str) -> float:
    """``learning_rate * (batch / reference_batch) ** power``, power 0.5 (``sqrt``), 1 (``linear``) or 0 (``none``).

    The one large-batch learning-rate rule of the recipes and the studies (``sqrt`` by ``math.sqrt``, correctly
    rounded; ``none`` needs no reference batch).

    Example:
        >>> scale_learning_rate(0.1, 4096, 128, "sqrt") == 0.1 * math.sqrt(32)
        True
    """
    power = LR_SCALING_POWERS[rule]
    if power == 0.0:
        return float(learning_rate)
    ratio = batch / reference_batch
    return float(learning_rate) * (math.sqrt(ratio) if power == 0.5 else ratio**power)


@dataclass(frozen=True)
class BatchPlan:
    """The batch arithmetic of a run and the learning rate that follows from it."""

    per_device: int
    accumulation: int
    world_size: int
    effective: int
    base_learning_rate: float
    learning_rate: float
    lr_scaling: str
    reference_batch_size: int | None

    def describe(self) -> str:
        """Two lines for the log: the effective batch and the (scaled) learning rate."""
        text = (
            f"effective batch = {self.per_device} per device x {self.accumulation} gradient accumulation x "
            f"{self.world_size} processes = {self.effective}\n"
        )
        if self.lr_scaling == "none":
            return text + f"learning rate = {self.learning_rate:g} (no scaling)"
        factor = self.learning_rate / self.base_learning_rate if self.base_learning_rate else float("nan")
        formula = "sqrt" if self.lr_scaling == "sqrt" else ""
        return text + (
            f"learning rate = {self.base_learning_rate:g} x {formula}({self.effective}/{self.reference_batch_size}) "
            f"= {self.base_learning_rate:g} x {factor:.4g} = {self.learning_rate:g} ({self.lr_scaling} scaling)"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for ``smoothout_run.json``)."""
        return asdict(self)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RecipeError(f"{name} must be a positive integer, got {value!r}.")
    return value


def plan_batch(
    per_device: int,
    accumulation: int,
    world_size: int,
    learning_rate: float,
    lr_scaling: str = "none",
    reference_batch_size: int | None = None,
) -> BatchPlan:
    """Check the batch settings and scale the learning rate; raises `RecipeError` for nonsense."""
    _positive_int("--per_device_train_batch_size", per_device)
    _positive_int("--gradient_accumulation_steps", accumulation)
    _positive_int("world size", world_size)
    if not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate) and learning_rate > 0):
        raise RecipeError(f"--learning_rate must be a positive number, got {learning_rate!r}.")
    if lr_scaling not in LR_SCALING_RULES:
        raise RecipeError(f"--lr_scaling must be one of {', '.join(LR_SCALING_RULES)}, got {lr_scaling!r}.")
    effective = per_device * accumulation * world_size
    if lr_scaling == "none":
        scaled = float(learning_rate)
    else:
        if reference_batch_size is None:
            raise RecipeError(
                f"--lr_scaling {lr_scaling} needs --reference_batch_size (the batch size the learning rate "
                f"{learning_rate:g} was tuned for); the authors used the per-device batch."
            )
        _positive_int("--reference_batch_size", reference_batch_size)
        scaled = scale_learning_rate(learning_rate, effective, reference_batch_size, lr_scaling)
    return BatchPlan(
        per_device=per_device,
        accumulation=accumulation,
        world_size=world_size,
        effective=effective,
        base_learning_rate=float(learning_rate),
        learning_rate=scaled,
        lr_scaling=lr_scaling,
        reference_batch_size=reference_batch_size,
    )


def plan_from_arguments(args: Any, options: Any) -> BatchPlan:
    """`plan_batch` from `TrainingArguments` and `RunOptions` (``lr_scaling``, ``reference_batch_size``).

    Sets ``args.learning_rate`` to the scaled rate, so the Trainer trains with it.
    """
    plan = plan_batch(
        args.per_device_train_batch_size,
        args.gradient_accumulation_steps,
        args.world_size,
        args.learning_rate,
        options.lr_scaling,
        options.reference_batch_size,
    )
    args.learning_rate = plan.learning_rate
    return plan
