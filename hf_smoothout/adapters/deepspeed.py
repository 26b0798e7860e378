"""DeepSpeed ZeRO-1/2 under the Trainer: remove the noise before DeepSpeed's optimizer step.

With DeepSpeed, accelerate's ``backward`` runs ``engine.backward(loss)`` and then, on the last
micro-batch of an accumulation window, ``engine.step()`` (clipping, optimizer step, copy of the fp32
master back into the module's weights): the update happens *inside* ``training_step``. Restoring the
weights after ``training_step`` would overwrite that update with the pre-step values. So the engine's
``step`` is wrapped once, on this engine instance only, to restore SmoothOut's noise first; the
restore after the backward pass in ``training_step`` then finds nothing to do. The weights DeepSpeed
steps on are the clean ones, bit-exactly, and equal its fp32 master afterwards.

ZeRO-1/2 keep every rank's weights whole (only optimizer state and gradients are partitioned), so
per-row scaling is exact and the noise follows the DDP rules (``independent_ranks``: one sample per
rank per micro-batch). ZeRO-3 partitions the weights themselves into flat 1-D pieces, gathered only
inside each module's forward: it is refused (see `check_deepspeed`).

Example:
    >>> from types import SimpleNamespace
    >>> engine = SimpleNamespace(step=lambda: "stepped")
    >>> calls = []
    >>> restore_before_step(engine, lambda: calls.append("restore"))
    True
    >>> engine.step(), calls
    ('stepped', ['restore'])
    >>> restore_before_step(engine, lambda: calls.append("again"))  # wrapped once only
    False
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

_WRAPPED = "_smoothout_restores_before_step"


def zero_stage(trainer: Any) -> int | None:
    """The ZeRO stage of a DeepSpeed-enabled Trainer (``None`` when it cannot be read)."""
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "deepspeed_plugin", None)
    stage = getattr(plugin, "zero_stage", None)
    if stage is None:
        config = getattr(getattr(trainer.args, "hf_deepspeed_config", None), "config", None) or {}
        stage = (config.get("zero_optimization") or {}).get("stage")
    return None if stage is None else int(stage)


def check_deepspeed(trainer: Any, samples: int) -> None:
    """Raise ``ValueError`` for DeepSpeed set-ups SmoothOut cannot run exactly: ZeRO-3, or several noisy copies."""
    stage = zero_stage(trainer)
    if stage == 3:
        raise ValueError(
            "SmoothOut does not support DeepSpeed ZeRO-3: it partitions every weight into flat 1-D pieces across "
            "ranks and gathers them only inside each module's forward, so per-row noise scaling and a bit-exact "
            "restore would need every parameter gathered around each micro-batch (the memory ZeRO-3 exists to "
            "save). Use ZeRO-2 (weights whole on every rank; supported, bit-exact) or DDP."
        )
    if samples > 1:
        raise ValueError(
            f"SmoothOut samples={samples} is not supported with DeepSpeed: DeepSpeed steps the optimizer inside the "
            "backward pass of the window's last micro-batch, so the extra noisy copies would be computed after the "
            "update. Use samples=1 (more micro-batches, i.e. gradient accumulation, average more noise draws)."
        )


def restore_before_step(engine: Any, restore: Callable[[], None]) -> bool:
    """Make ``engine.step`` call ``restore()`` first; returns whether it wrapped (False if already wrapped)."""
    if getattr(engine, _WRAPPED, False):
        return False
    original = engine.step

    @functools.wraps(original)
    def step(*args: Any, **kwargs: Any) -> Any:
        restore()  # DeepSpeed clips, steps and copies its master into the weights: they must be clean first
        return original(*args, **kwargs)

    engine.step = step
    setattr(engine, _WRAPPED, True)
    return True
