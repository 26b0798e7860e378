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
rank per micro-batch). ZeRO-3 partitions the weights themselves: see `hf_smoothout.placement.zero3`; its
parameter offload and ZeRO++ secondary partitions are refused here (`check_deepspeed`).

Example:
    >>> from types import SimpleNamespace
    >>> engine = SimpleNamespace(step=lambda: "stepped")
    >>> calls = []
    >>> restore_before_step(engine, lambda: calls.append("restore"))
    True
    >>> engine.step(), calls
    ('stepped', ['restore'])
    >>> restore_before_step(engine, lambda: calls.append("again"))  # wrapped once; the newest restore runs
    False
    >>> engine.step(), calls
    ('stepped', ['restore', 'again'])
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

_WRAPPED = "_smoothout_restores_before_step"
_RESTORE = "_smoothout_restore_before_step"


def zero_settings(trainer: Any) -> dict[str, Any]:
    """The ``zero_optimization`` section of a DeepSpeed-enabled Trainer's config (empty when it cannot be read)."""
    config = getattr(getattr(trainer.args, "hf_deepspeed_config", None), "config", None) or {}
    return config.get("zero_optimization") or {}


def zero_stage(trainer: Any) -> int | None:
    """The ZeRO stage of a DeepSpeed-enabled Trainer (``None`` when it cannot be read)."""
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "deepspeed_plugin", None)
    stage = getattr(plugin, "zero_stage", None)
    if stage is None:
        stage = zero_settings(trainer).get("stage")
    return None if stage is None else int(stage)


def check_deepspeed(trainer: Any, samples: int) -> None:
    """Raise ``ValueError`` for DeepSpeed set-ups SmoothOut cannot run exactly: several noisy copies, or ZeRO-3
    with its parameters offloaded or with ZeRO++ secondary partitions (see `hf_smoothout.placement.zero3`)."""
    if zero_stage(trainer) == 3:
        zero = zero_settings(trainer)
        offload = (zero.get("offload_param") or {}).get("device", "none")
        if str(offload).lower() not in ("none", ""):
            raise ValueError(
                f"SmoothOut does not support ZeRO-3 with offload_param (device {offload!r}): DeepSpeed then swaps the "
                "partitions SmoothOut perturbs in and out of host or NVMe memory, which is not verified to keep the "
                "noise window exact. Keep the parameters on the device (offload_optimizer is fine), or use ZeRO-2."
            )
        if int(zero.get("zero_hpz_partition_size", 1) or 1) > 1:
            raise ValueError(
                "SmoothOut does not support ZeRO++ hpZ (zero_hpz_partition_size > 1): the backward gathers the "
                "weights from a secondary partition SmoothOut does not perturb. Set it to 1."
            )
    if samples > 1:
        raise ValueError(
            f"SmoothOut samples={samples} is not supported with DeepSpeed: DeepSpeed steps the optimizer inside the "
            "backward pass of the window's last micro-batch, so the extra noisy copies would be computed after the "
            "update. Use samples=1 (more micro-batches, i.e. gradient accumulation, average more noise draws)."
        )


def deepspeed_engine_of(model: Any) -> Any | None:
    """``model`` itself when it is a DeepSpeed engine (what ``deepspeed.initialize`` and accelerate's ``prepare``
    return under DeepSpeed), found by class name so that nothing imports deepspeed; else ``None``."""
    names = {cls.__name__ for cls in type(model).__mro__}
    return model if "DeepSpeedEngine" in names and callable(getattr(model, "step", None)) else None


def deepspeed_flattened(params: list[Any]) -> bool:
    """Whether DeepSpeed is initialized in this process and a parameter is a view into a larger (flat) buffer,
    the layout ZeRO-1/2 gives the module's weights."""
    ds = sys.modules.get("deepspeed")
    comm = getattr(ds, "comm", None) if ds is not None else None
    try:
        initialized = bool(comm is not None and comm.is_initialized())
    except Exception:  # an older or partial deepspeed: no claim
        return False
    if not initialized:
        return False
    for p in params:
        data = getattr(p, "data", p)
        if data.untyped_storage().nbytes() > data.numel() * data.element_size():
            return True
    return False


def restore_before_step(engine: Any, restore: Callable[[], None]) -> bool:
    """Make ``engine.step`` call ``restore()`` first; returns whether it wrapped (False if already wrapped, in
    which case ``restore`` replaces the earlier callable: the newest SmoothOut engine restores)."""
    setattr(engine, _RESTORE, restore)
    if getattr(engine, _WRAPPED, False):
        return False
    original = engine.step

    @functools.wraps(original)
    def step(*args: Any, **kwargs: Any) -> Any:
        getattr(engine, _RESTORE)()  # DeepSpeed clips, steps and copies its master into the weights: clean first
        return original(*args, **kwargs)

    engine.step = step
    setattr(engine, _WRAPPED, True)
    return True
