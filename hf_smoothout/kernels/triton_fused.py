"""The fused counter-based kernel (Triton): one pass per weight draws Philox numbers keyed by ``(seed, rank, stream,
draw)`` and the element's index, computes what the law needs per row, and writes the noisy weights; the noise is
never stored.

Its numbers are its own (Philox, not the reference generators), under the same law: chosen only by name
(``SmoothOutConfig(kernel="triton")``), until a GPU run has checked it against the torch path
(``tests/test_cuda.py``). On CPU tensors it runs under Triton's interpreter (``TRITON_INTERPRET=1``), which is how
the tests check it without a GPU. Per parameter it launches one program (two for the per-row laws), against about
five for the reference path; the noise is a pure function of the key, so resume, regenerate-free suspend and
independence from the launch grid hold as for every kernel.

Example:
    >>> from hf_smoothout.kernels import KERNELS
    >>> KERNELS["triton"].automatic, KERNELS["triton"].reference_numbers
    (False, False)
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ..noise import ROW_NORM_EPS
from ..plan import Plan
from ..restore import RestoreStrategy
from .base import DrawContext, DrawKernel

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_available() -> bool:
    """Whether triton is installed (the ``[gpu]`` extra)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels on CPU tensors through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def rows_view(tensor: torch.Tensor, row_axis: int) -> torch.Tensor | None:
    """``tensor`` as a 2-D ``[rows, row_len]`` view with its row axis first (no copy), or ``None`` if impossible."""
    if tensor.ndim == 0:
        return tensor.view(1, 1)
    if tensor.ndim == 1:
        return tensor.view(-1, 1)
    moved = tensor.movedim(row_axis, 0)
    try:
        return moved.view(moved.shape[0], -1)
    except RuntimeError:  # the other axes cannot be flattened without a copy
        return None


class TritonKernel(DrawKernel):
    """One fused launch per weight (two for per-row laws); CUDA, or CPU under the interpreter."""

    name = "triton"
    reference_numbers = False
    automatic = False

    @classmethod
    def why_not(cls, plan: Plan, restore: RestoreStrategy) -> str | None:
        if not triton_available():
            return "triton is not installed (pip install 'hf-smoothout[gpu]')"
        if not restore.second_buffer:
            return f"restore={restore.name!r} writes in place; the kernel needs copy or swap"
        for slot in plan.slots:
            device = slot.data.device.type
            if device != "cuda" and not (device == "cpu" and interpreting()):
                return f"{slot.name!r} is on {device} (CUDA, or CPU with TRITON_INTERPRET=1)"
            if slot.span is not None or slot.reduce_groups:
                return f"{slot.name!r} is sharded"
            if slot.data.dtype not in _DTYPES:
                return f"{slot.name!r} is {slot.data.dtype}"
            if slot.data.numel() >= 2**31:
                return f"{slot.name!r} has 2^31 elements or more"
            second = slot.backup if slot.backup is not None else slot.data
            if rows_view(slot.data, slot.row_axis) is None or rows_view(second, slot.row_axis) is None:
                return f"{slot.name!r} has no [rows, row length] view"
        return None

    @classmethod
    def supports(cls, plan: Plan, restore: RestoreStrategy) -> bool:
        return cls.why_not(plan, restore) is None

    def draw_and_apply(self, ctx: DrawContext, strength: float) -> None:
        form = ctx.law.fused_form
        if form is None:
            raise ValueError(f"SmoothOut: the triton kernel has no fused form of adapt={ctx.law.name!r}.")
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "SmoothOut: the triton kernel does not run under CUDA-graph capture (the noise is drawn outside the "
                "graph). Perturb outside the captured region, or use kernel='auto'."
            )
        from ._triton_impl import fused_perturb_

        gaussian = ctx.key.distribution == "gaussian"
        for slot in ctx.plan.slots:
            fused_perturb_(
                ctx.restore.noisy(slot),
                ctx.restore.clean(slot),
                seed=ctx.key.fused_seed(slot.index),
                form=form,
                gaussian=gaussian,
                strength=strength,
                row_axis=slot.row_axis,
                eps=ROW_NORM_EPS,
            )
