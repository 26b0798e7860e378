"""FSDP2 (``fully_shard``, transformers' ``DistributedConfig``): each rank perturbs its local shard in place.

FSDP2 all-gathers the noisy shards in the forward pass, so all ranks see one global noise sample per micro-batch
(whatever ``independent_ranks`` says). For dim-0 shards over a 1-D mesh the noise is drawn per block of global rows
from seeds without the rank, so it does not depend on the shard count; other layouts draw from this rank's
streams. Rows split across ranks (GPT-2's ``Conv1D`` under ``Shard(0)``) get their per-row norms from an
all-reduce of the partial sums (`split_row_scale`). See `hf_smoothout.adapters.dtensor` for the layout helpers.

Example:
    >>> from torch import nn
    >>> FSDP2Placement.applies(nn.Linear(2, 2), [])
    False
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..adapters.dtensor import (
    check_fsdp_shared_uneven_shards,
    dim0_shard_span,
    is_dtensor,
    local_tensor,
    row_split_groups,
    rows_are_local,
)
from ..config import SmoothOutConfig
from ..laws import get_noise_law
from ..noise import ROW_NORM_EPS, row_length
from ..plan import Slot, Stream
from ..seeding import DrawKey
from ..selection import SelectedParameter
from .base import Placement, all_ranks_agree


class FSDP2Placement(Placement):
    """Selected parameters that are DTensors: the local shard is what the engine perturbs and restores."""

    name = "fsdp2"

    @classmethod
    def applies(cls, model: nn.Module, selected: list[SelectedParameter]) -> bool:
        return any(is_dtensor(s.param) for s in selected)

    def check(self, config: SmoothOutConfig, selected: list[SelectedParameter]) -> None:
        if not config.enabled:
            return
        sharded = [s for s in selected if is_dtensor(s.param)]
        split = [s.name for s in sharded if not rows_are_local(s.param, s.row_axis)]
        copy_restore = config.denoise and config.restore in ("copy", "auto")  # auto: copy for sharded parameters
        if split and get_noise_law(config.adapt).row_scaled and not copy_restore:
            raise ValueError(
                f"SmoothOut: {split[0]!r} is sharded across its rows (e.g. GPT-2's Conv1D, stored [in, out], under "
                "FSDP2's Shard(0)); per-row scaling (adapt='filter') of split rows all-reduces the row norms, which "
                "is implemented for restore='copy' (what the default 'auto' runs there) with de-noising only. Use "
                "those settings, exclude the "
                "parameters with config.exclude, or use adapt='none' or 'weight' (element-wise, any sharding)."
            )
        if config.restore == "swap":
            raise ValueError(
                f"SmoothOut: restore='swap' cannot point {sharded[0].name!r} at another buffer: it is sharded "
                "(FSDP2/DTensor), and its local shard belongs to FSDP's own storage. Use restore='copy' (bit-exact)."
            )

    def check_layout(self, model: nn.Module, selected: list[SelectedParameter]) -> None:
        # FSDP2 gathering a tied, unevenly sharded weight from a stale copy
        check_fsdp_shared_uneven_shards(model, [(sel.name, sel.param) for sel in selected])

    def swap_blocker(self) -> str | None:
        return "parameters are sharded (FSDP2/DTensor)"

    def live(self, param: nn.Parameter) -> torch.Tensor:
        return local_tensor(param) if is_dtensor(param) else param

    def slot(self, selected: SelectedParameter, index: int, *, row_scaled: bool) -> Slot:
        p = selected.param
        slot = Slot(selected.name, p, selected.row_axis, local_tensor(p), selected.module, selected.local_name)
        slot.index, slot.span, slot.global_shape = index, dim0_shard_span(p), tuple(p.shape)
        if row_scaled:
            slot.reduce_groups = row_split_groups(p, selected.row_axis)
        return slot

    def noise_rank(self, rank: int, independent_ranks: bool) -> int:
        # Every rank holds other rows: the forward pass gathers one global sample per step, whatever
        # independent_ranks says; streams of layouts without row blocks are this rank's own.
        return rank

    def draw_(self, slot: Slot, out: torch.Tensor, stream: Stream, key: DrawKey) -> None:
        if slot.span is None:
            super().draw_(slot, out, stream, key)
            return
        self.draw_global_blocks_(slot, out, stream, key, slot.global_shape)

    def agree(self, flag: bool, device: torch.device) -> bool:
        return all_ranks_agree(flag, device, self.world_size)

    def split_row_scale(
        self, slot: Slot, clean: torch.Tensor, draw: torch.Tensor, strength: float, *, normalize: bool = True
    ) -> torch.Tensor:
        return split_row_scale(slot, clean, draw, strength, normalize=normalize)


def split_row_scale(
    slot: Slot, clean: torch.Tensor, draw: torch.Tensor, strength: float, *, normalize: bool = True
) -> torch.Tensor:
    """The per-row multiplier of ``filter`` (``normalize``) or ``filter_std`` for rows split across ranks: partial
    squared norms all-reduced first."""
    assert slot.norms is not None
    scale, draw_norm = slot.norms
    dims = tuple(d for d in range(clean.ndim) if d != slot.row_axis)
    torch.sum(clean.square(), dim=dims, keepdim=True, out=scale)
    torch.sum(draw.square(), dim=dims, keepdim=True, out=draw_norm)
    both = torch.stack([scale, draw_norm])
    for group in slot.reduce_groups:
        torch.distributed.all_reduce(both, group=group)
    torch.sqrt(both[0], out=scale)
    if not normalize:  # filter_std: the row length of the whole (global) row
        return scale.mul_(strength / math.sqrt(row_length(slot.param, slot.row_axis)))
    torch.sqrt(both[1], out=draw_norm)
    return scale.div_(draw_norm.add_(ROW_NORM_EPS)).mul_(strength)
