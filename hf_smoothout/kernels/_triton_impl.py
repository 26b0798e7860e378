"""The Triton programs of the fused kernel (imported only when it runs: ``import hf_smoothout`` never loads triton).

Two programs per parameter, both drawing ``u`` from Philox keyed by the parameter's seed and the element's index in
row-major order of its rows (``row * row_len + col``), so the numbers depend on neither the memory layout nor the
launch grid or block sizes, and are never written to memory:

- `_row_scale_kernel` (row laws only), one program per row: ``||w_row||`` and, for ``row_norm``, ``||u_row||``,
  accumulated in float32; writes the row's multiplier.
- `_apply_kernel`, one program per block of elements: ``noisy = clean + multiplier * u``, computed in float32 and
  stored in the weights' dtype.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_fused import rows_view

FORM_IDS = {"constant": 0, "element": 1, "row_norm": 2, "row_length": 3}
APPLY_BLOCK = 1024
MAX_ROW_BLOCK = 1024


@triton.jit
def _row_scale_kernel(
    clean_ptr,
    scale_ptr,
    seed,
    row_len,
    stride_r,
    stride_c,
    strength,
    eps,
    inv_sqrt_n,
    FORM: tl.constexpr,
    GAUSSIAN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    acc_w = tl.zeros([BLOCK], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, row_len, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < row_len
        w = tl.load(clean_ptr + row * stride_r + cols * stride_c, mask=mask, other=0.0).to(tl.float32)
        acc_w += w * w
        if FORM == 2:
            if GAUSSIAN:  # noqa: SIM108 - a compile-time branch of the Triton program
                u = tl.randn(seed, row * row_len + cols)
            else:
                u = tl.rand(seed, row * row_len + cols) * 2.0 - 1.0
            u = tl.where(mask, u, 0.0)
            acc_u += u * u
    w_norm = tl.sqrt(tl.sum(acc_w, axis=0))
    if FORM == 2:  # noqa: SIM108 - a compile-time branch of the Triton program
        scale = strength * w_norm / (tl.sqrt(tl.sum(acc_u, axis=0)) + eps)
    else:
        scale = strength * w_norm * inv_sqrt_n
    tl.store(scale_ptr + row, scale)


@triton.jit
def _apply_kernel(
    clean_ptr,
    noisy_ptr,
    scale_ptr,
    seed,
    numel,
    row_len,
    clean_stride_r,
    clean_stride_c,
    noisy_stride_r,
    noisy_stride_c,
    strength,
    FORM: tl.constexpr,
    GAUSSIAN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = index < numel
    row = index // row_len
    col = index % row_len
    w = tl.load(clean_ptr + row * clean_stride_r + col * clean_stride_c, mask=mask, other=0.0).to(tl.float32)
    if GAUSSIAN:  # noqa: SIM108 - a compile-time branch of the Triton program
        u = tl.randn(seed, index)
    else:
        u = tl.rand(seed, index) * 2.0 - 1.0
    if FORM == 0:
        noisy = w + strength * u
    elif FORM == 1:
        noisy = w + strength * w * u
    else:
        multiplier = tl.load(scale_ptr + row, mask=mask, other=0.0)
        noisy = w + multiplier * u
    tl.store(
        noisy_ptr + row * noisy_stride_r + col * noisy_stride_c,
        noisy.to(noisy_ptr.dtype.element_ty),
        mask=mask,
    )


def fused_perturb_(
    noisy: torch.Tensor,
    clean: torch.Tensor,
    *,
    seed: int,
    form: str,
    gaussian: bool,
    strength: float,
    row_axis: int,
    eps: float,
    apply_block: int = APPLY_BLOCK,
    row_block: int = MAX_ROW_BLOCK,
) -> None:
    """Write ``clean + tau`` into ``noisy`` for one parameter (block sizes change the speed, never the result)."""
    if clean.numel() == 0:
        return
    clean2, noisy2 = rows_view(clean, row_axis), rows_view(noisy, row_axis)
    assert clean2 is not None and noisy2 is not None and clean2.shape == noisy2.shape
    rows, row_len = clean2.shape
    form_id = FORM_IDS[form]
    scale = clean2  # a placeholder pointer for the element-wise forms
    if form_id >= 2:
        scale = torch.empty(rows, device=clean.device, dtype=torch.float32)
        block = min(triton.next_power_of_2(row_len), row_block)
        _row_scale_kernel[(rows,)](
            clean2,
            scale,
            seed,
            row_len,
            clean2.stride(0),
            clean2.stride(1),
            float(strength),
            float(eps),
            1.0 / math.sqrt(row_len),
            FORM=form_id,
            GAUSSIAN=gaussian,
            BLOCK=block,
        )
    numel = rows * row_len
    _apply_kernel[(triton.cdiv(numel, apply_block),)](
        clean2,
        noisy2,
        scale,
        seed,
        numel,
        row_len,
        clean2.stride(0),
        clean2.stride(1),
        noisy2.stride(0),
        noisy2.stride(1),
        float(strength),
        FORM=form_id,
        GAUSSIAN=gaussian,
        BLOCK=apply_block,
    )
