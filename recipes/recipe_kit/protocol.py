"""Training-protocol options the SmoothOut paper's experiments need beyond `TrainingArguments`.

* ``--lr_milestones 0.2 0.4 0.6 --lr_decay 0.1``: step decay of the learning rate at those fractions of the
  optimizer steps (the authors: x0.1 at epochs 10, 20 and 30 of 50), instead of ``--lr_scheduler_type``.
* ``--reset_momentum_each_epoch``: clear the optimizer state at every epoch start, which the authors' script
  gets by building a new SGD every epoch.

Example:
    >>> import torch
    >>> options = ProtocolOptions(lr_milestones=[0.5], lr_decay=0.1)
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    >>> scheduler = options.scheduler(opt, num_training_steps=10)
    >>> for _ in range(5):
    ...     opt.step(); scheduler.step()
    >>> opt.param_groups[0]["lr"]
    0.1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback

from hf_smoothout import SmoothOutTrainer

from .errors import RecipeError


def milestone_steps(fractions: list[float], total_steps: float) -> list[int]:
    """The optimizer steps after which the LR drops: ``round(fraction * total_steps)``, at least step 1 and
    strictly increasing (two fractions that round to the same step keep two distinct drops).

    The one milestone rule of the recipes and the studies; ``total_steps`` may be fractional (epochs x steps per
    epoch).

    Example:
        >>> milestone_steps([0.2, 0.4, 0.6], 50 * 14)  # epochs 10 / 20 / 30 of 50, 14 steps per epoch
        [140, 280, 420]
        >>> milestone_steps([0.4, 0.6], 4)  # 1.6 and 2.4 both round to 2
        [2, 3]
    """
    steps: list[int] = []
    for fraction in fractions:
        step = max(1, round(fraction * total_steps))
        steps.append(max(step, steps[-1] + 1) if steps else step)
    return steps


@dataclass
class ProtocolOptions:
    """Step learning-rate decay and per-epoch momentum reset (the authors' protocol)."""

    lr_milestones: list[float] | None = field(
        default=None,
        metadata={
            "help": "Fractions of the optimizer steps at which the LR is multiplied by --lr_decay (the authors: "
            "0.2 0.4 0.6, i.e. epochs 10/20/30 of 50). Replaces --lr_scheduler_type; warm-up is not applied."
        },
    )
    lr_decay: float = field(default=0.1, metadata={"help": "LR factor at every --lr_milestones point."})
    reset_momentum_each_epoch: bool = field(
        default=False,
        metadata={"help": "Clear the optimizer state (SGD momentum) at every epoch start, as the authors' script."},
    )

    def check(self) -> None:
        if self.lr_milestones is not None:
            if not self.lr_milestones or any(not 0.0 < m < 1.0 for m in self.lr_milestones):
                raise RecipeError(f"--lr_milestones must be fractions in (0, 1), got {self.lr_milestones}.")
            if sorted(self.lr_milestones) != list(self.lr_milestones):
                raise RecipeError(f"--lr_milestones must be increasing, got {self.lr_milestones}.")
        if not self.lr_decay > 0.0:
            raise RecipeError(f"--lr_decay must be > 0, got {self.lr_decay}.")

    def milestone_steps(self, num_training_steps: int) -> list[int]:
        """The optimizer steps at which the LR drops (at least step 1, strictly increasing)."""
        return milestone_steps(self.lr_milestones or [], num_training_steps)

    def scheduler(self, optimizer: torch.optim.Optimizer, num_training_steps: int) -> Any:
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=self.milestone_steps(num_training_steps), gamma=self.lr_decay
        )

    def describe(self) -> dict[str, Any] | None:
        if self.lr_milestones is None and not self.reset_momentum_each_epoch:
            return None
        return {
            "lr_milestones": self.lr_milestones,
            "lr_decay": self.lr_decay,
            "reset_momentum_each_epoch": self.reset_momentum_each_epoch,
        }


class MomentumResetCallback(TrainerCallback):
    """Clear the optimizer state at the start of every epoch: SGD restarts its momentum from zero.

    ``resets`` counts the epochs where there was state to clear.

    Example:
        >>> p = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
        >>> p.grad = torch.ones(2); opt.step()
        >>> "momentum_buffer" in opt.state[p]
        True
        >>> MomentumResetCallback().on_epoch_begin(None, None, None, optimizer=opt)
        >>> len(opt.state)
        0
    """

    def __init__(self) -> None:
        self.resets = 0

    def on_epoch_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if optimizer is None:
            raise RuntimeError("MomentumResetCallback needs the optimizer: the Trainer passes it to callbacks.")
        inner = optimizer
        while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
            inner = inner.optimizer  # accelerate's AcceleratedOptimizer wraps the torch optimizer
        if len(inner.state):
            inner.state.clear()
            self.resets += 1


class ProtocolTrainer(SmoothOutTrainer):
    """`SmoothOutTrainer` with the step decay of `ProtocolOptions` (through the public ``create_scheduler``)."""

    def __init__(self, *args: Any, protocol: ProtocolOptions | None = None, **kwargs: Any) -> None:
        self.protocol = protocol or ProtocolOptions()
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if self.protocol.reset_momentum_each_epoch:
            callbacks.append(MomentumResetCallback())
        super().__init__(*args, callbacks=callbacks, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        if self.lr_scheduler is None and self.protocol.lr_milestones is not None:
            self.lr_scheduler = self.protocol.scheduler(optimizer or self.optimizer, num_training_steps)
        return super().create_scheduler(num_training_steps, optimizer)
