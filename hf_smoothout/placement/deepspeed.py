"""DeepSpeed ZeRO-1/2: whole weights, viewed into DeepSpeed's flat buffers, stepped inside ``backward``.

DeepSpeed (and accelerate's ``accelerator.backward`` under DeepSpeed) runs the optimizer step inside the window,
so the engine must restore before it: the placement installs that guard when the engine is built on the DeepSpeed
engine itself, and refuses to draw when the weights live in flat buffers but no guard was installed.

Example:
    >>> from torch import nn
    >>> DeepSpeedPlacement.applies(nn.Linear(2, 2), [])
    False
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..adapters.deepspeed import deepspeed_engine_of, deepspeed_flattened
from ..plan import Slot
from ..selection import SelectedParameter
from .base import Placement


class DeepSpeedPlacement(Placement):
    """Weights owned by a DeepSpeed engine (ZeRO-1/2 flat groups)."""

    name = "deepspeed"

    @classmethod
    def applies(cls, model: nn.Module, selected: list[SelectedParameter]) -> bool:
        return deepspeed_engine_of(model) is not None or deepspeed_flattened([s.param for s in selected])

    def attach(self, engine: Any) -> None:
        deepspeed = deepspeed_engine_of(engine.model)
        if deepspeed is not None and engine.config.enabled:
            engine.guard_deepspeed_step(deepspeed)

    def check_before_perturb(self, slots: list[Slot], *, step_guarded: bool) -> None:
        if step_guarded or not deepspeed_flattened([slot.param for slot in slots]):
            return
        raise RuntimeError(
            "SmoothOut: the model's weights live in DeepSpeed's flat buffers (ZeRO-1/2), but this engine was built "
            "on the inner module, so it cannot restore before DeepSpeed's optimizer step, which runs inside "
            "accelerator.backward() / engine.step(): every update would be undone. Build SmoothOut on the model "
            "accelerator.prepare (or deepspeed.initialize) returned, or call "
            "smoothout.guard_deepspeed_step(deepspeed_engine) once after preparing."
        )
