"""The learning-rate schedule of the studies: large-batch scaling, step decay at milestones, steps per epoch.

* :func:`scale_learning_rate` -- ``lr * (batch / reference) ** power`` (power 0.5 ``sqrt``, 1 ``linear``, 0
  ``none``); the same function scales the recipes' learning rate (``recipe_kit.batching``).
* :func:`lr_rule_formula` -- that rule as the reports write it.
* :func:`milestone_steps` -- the optimizer steps of the LR drops; the same function places the recipes'
  ``--lr_milestones`` (``recipe_kit.protocol``).
* :func:`update_steps_per_epoch` -- optimizer steps per epoch as the Trainer counts them.
* :func:`step_scheduler` -- LR x ``decay`` at each milestone step.

Example:
    >>> steps = update_steps_per_epoch(55000, micro=128, accumulation=32)
    >>> steps, milestone_steps([0.2, 0.4, 0.6], 50 * steps)
    (14, [140, 280, 420])
    >>> round(scale_learning_rate(0.1, 4096, 128, "sqrt"), 6), lr_rule_formula("sqrt", "B / 128")
    (0.565685, 'lr * (B / 128) ** 0.5')
"""

from __future__ import annotations

import math

import torch
from recipe_kit.batching import LR_SCALING_RULES, scale_learning_rate
from recipe_kit.protocol import milestone_steps

__all__ = [
    "LR_SCALING_RULES",
    "lr_rule_formula",
    "milestone_steps",
    "scale_learning_rate",
    "step_scheduler",
    "update_steps_per_epoch",
]


def lr_rule_formula(rule: str, ratio: str) -> str:
    """The scaling rule ``rule`` written out for the batch ratio ``ratio`` (e.g. ``"B / 128"``).

    Example:
        >>> lr_rule_formula("linear", "B / 128"), lr_rule_formula("none", "B / 128")
        ('lr * B / 128', 'lr')
    """
    return {"sqrt": f"lr * ({ratio}) ** 0.5", "linear": f"lr * {ratio}", "none": "lr"}[rule]


def update_steps_per_epoch(examples: int, micro: int, accumulation: int) -> int:
    """Optimizer steps per epoch as the Trainer counts them (last micro-batch and last step may be partial).

    Example:
        >>> update_steps_per_epoch(55000, 128, 32), update_steps_per_epoch(55000, 4096, 1)
        (14, 14)
    """
    micro_batches = math.ceil(examples / micro)
    return max(math.ceil(micro_batches / accumulation), 1)


def step_scheduler(
    optimizer: torch.optim.Optimizer, milestones: list[int], decay: float
) -> torch.optim.lr_scheduler.MultiStepLR:
    """LR x ``decay`` at each milestone (counted in optimizer steps; the Trainer steps it once per update).

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> sched = step_scheduler(opt, [2, 3], 0.1)
        >>> lrs = []
        >>> for _ in range(4):
        ...     lrs.append(round(opt.param_groups[0]["lr"], 6)); opt.step(); sched.step()
        >>> lrs
        [1.0, 1.0, 0.1, 0.01]
    """
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=decay)
