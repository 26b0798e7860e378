"""DeepSpeed ZeRO-3: each rank perturbs its own flat partition of every weight in place, never gathering it.

ZeRO-3 keeps of every parameter a flat 1-D slice per rank (``param.ds_tensor``: elements ``[r * n, (r + 1) * n)``
of the flattened weight, ``n = ceil(numel / ranks)``, padding at the tail of the last ranks) and gathers the slices
inside each module's forward and backward. So the engine adds the noise to the slices (the padding left out) and the
forward all-gathers noisy weights: every rank computes with one global sample per micro-batch.

- **The draw** is made per block of global *elements* from seeds without the rank (`draw_row_blocks_` over the
  flattened weight), so the gathered noise does not depend on the number of ranks.
- **Per-row laws** (``adapt="filter"``): rows are cut anywhere by the slices, so each rank sums the squares of its
  elements per row (segment sums over its global element range) and one all-reduce per weight completes the norms.
- **Gathered copies**: ZeRO-3 keeps a gathered copy alive across micro-batches for small ("persistent") parameters
  and after any forward without a backward (evaluation, generation), and a forward uses such a copy as it is. After
  noise goes in or out, every selected parameter whose copy is still gathered is released (`release_copies`), so
  the next forward gathers the current slices.
- **The optimizer step** runs inside ``engine.step()`` (the DeepSpeed step guard restores first) and copies the fp32
  master into the slices: after every step they equal the master, cast.

Refused, with the reason: ``restore="swap"`` or ``"regenerate"`` (the slices are views of DeepSpeed's flat buffer;
copy is bit-exact), ZeRO++ secondary partitions (hpZ: the backward gathers from a second, clean copy), and drawing
without the step guard.

Example:
    >>> from torch import nn
    >>> Zero3Placement.applies(nn.Linear(2, 2), [])
    False
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..config import SmoothOutConfig
from ..noise import ROW_NORM_EPS
from ..plan import Slot, Stream
from ..seeding import DrawKey, draw_row_blocks_
from ..selection import SelectedParameter, logical_shape
from .base import all_ranks_agree
from .deepspeed import DeepSpeedPlacement

ROW_ID_CHUNK = 1 << 20
"""Elements per chunk of the segment sums (bounds the row-index temporaries)."""


def is_zero3_partitioned(param: torch.Tensor) -> bool:
    """Whether ``param`` is partitioned by DeepSpeed ZeRO-3 (it carries a ``ds_tensor`` slice)."""
    return getattr(param, "ds_tensor", None) is not None and hasattr(param, "ds_numel")


def partition_span(param: Any) -> tuple[int, int]:
    """``(first global element, elements held)`` of this rank's slice of ``param``, the padding left out."""
    slice_numel = int(param.ds_tensor.ds_numel)
    group = getattr(param, "ds_process_group", None)
    rank = torch.distributed.get_rank(group) if torch.distributed.is_initialized() else 0
    start = rank * slice_numel
    return start, max(0, min(slice_numel, int(param.ds_numel) - start))


class Zero3Placement(DeepSpeedPlacement):
    """Weights partitioned by DeepSpeed ZeRO-3: this rank's flat slice is what the engine perturbs and restores."""

    name = "zero3"

    @classmethod
    def applies(cls, model: nn.Module, selected: list[SelectedParameter]) -> bool:
        return any(is_zero3_partitioned(s.param) for s in selected)

    def check(self, config: SmoothOutConfig, selected: list[SelectedParameter]) -> None:
        if not config.enabled:
            return
        partitioned = [s for s in selected if is_zero3_partitioned(s.param)]
        if config.denoise and config.restore in ("swap", "regenerate"):
            raise ValueError(
                f"SmoothOut: restore={config.restore!r} cannot run on {partitioned[0].name!r}: it is partitioned by "
                "DeepSpeed ZeRO-3, and its slice is a view into DeepSpeed's flat buffer. Use restore='copy' (or the "
                "default 'auto'), which is bit-exact."
            )
        secondary = [s.name for s in partitioned if getattr(s.param, "ds_secondary_tensor", None) is not None]
        if secondary:
            raise ValueError(
                f"SmoothOut: {secondary[0]!r} has a ZeRO++ secondary partition (hpZ, zero_hpz_partition_size > 1), "
                "from which the backward gathers a copy SmoothOut does not perturb: forward and backward would see "
                "different weights. Set zero_hpz_partition_size to 1."
            )

    def check_before_perturb(self, slots: list[Slot], *, step_guarded: bool) -> None:
        if step_guarded:
            return
        raise RuntimeError(
            "SmoothOut: the model is partitioned by DeepSpeed ZeRO-3, but no step guard is installed, so the restore "
            "would run after DeepSpeed's optimizer step (inside accelerator.backward() / engine.step()) and undo it. "
            "Build SmoothOut on the model deepspeed.initialize (or accelerator.prepare) returned, or call "
            "smoothout.guard_deepspeed_step(deepspeed_engine) once after preparing; SmoothOutTrainer does it."
        )

    def swap_blocker(self) -> str | None:
        return "parameters are partitioned by DeepSpeed ZeRO-3 (views of its flat buffer)"

    def live(self, param: nn.Parameter) -> torch.Tensor:
        if not is_zero3_partitioned(param):
            return param
        _, held = partition_span(param)
        return param.ds_tensor.narrow(0, 0, held)

    def slot(self, selected: SelectedParameter, index: int, *, row_scaled: bool) -> Slot:
        p = selected.param
        if not is_zero3_partitioned(p):
            return super().slot(selected, index, row_scaled=row_scaled)
        start, held = partition_span(p)
        shape = logical_shape(p)
        slot = Slot(selected.name, p, 0, self.live(p), selected.module, selected.local_name, index=index)
        rows = int(shape[selected.row_axis]) if len(shape) else 1
        inner = math.prod(int(size) for size in shape[selected.row_axis + 1 :]) if len(shape) else 1
        slot.span, slot.global_shape, slot.flat = (int(p.ds_numel), start, held), tuple(shape), (start, inner, rows)
        if row_scaled:
            slot.reduce_groups = (getattr(p, "ds_process_group", None),)
            slot.norms = tuple(torch.empty(rows, device=slot.data.device, dtype=torch.float32) for _ in range(2))
        return slot

    def noise_rank(self, rank: int, independent_ranks: bool) -> int:
        return rank  # every slice is drawn from rank-free element blocks; the forward gathers one global sample

    def draw_(self, slot: Slot, out: torch.Tensor, stream: Stream, key: DrawKey) -> None:
        if slot.flat is None:
            super().draw_(slot, out, stream, key)
            return
        if stream.block_generator is None:
            stream.block_generator = torch.Generator(device=stream.device)
        seed = key.row_block_seed(slot.index)
        assert slot.span is not None
        flat_shape = (slot.span[0],)  # blocks of global elements of the flattened weight
        draw_row_blocks_(
            out, slot.span, flat_shape, seed, key.distribution, stream.block_scratch_for, stream.block_generator
        )

    def agree(self, flag: bool, device: torch.device) -> bool:
        return all_ranks_agree(flag, device, self.world_size)

    def split_row_scale(
        self, slot: Slot, clean: torch.Tensor, draw: torch.Tensor, strength: float, *, normalize: bool = True
    ) -> torch.Tensor:
        """A per-element multiplier: the row scale of each element's (global) row, from all-reduced segment sums."""
        assert slot.flat is not None and slot.norms is not None
        start, inner, rows = slot.flat
        sums, draw_sums = slot.norms
        sums.zero_()
        draw_sums.zero_()
        for low in range(0, clean.numel(), ROW_ID_CHUNK):
            high = min(clean.numel(), low + ROW_ID_CHUNK)
            ids = _row_ids(start + low, start + high, inner, rows, clean.device)
            sums.index_add_(0, ids, clean[low:high].float().square())
            draw_sums.index_add_(0, ids, draw[low:high].float().square())
        both = torch.stack([sums, draw_sums])
        for group in slot.reduce_groups:
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(both, group=group)
        row_scale = both[0].sqrt_()
        if normalize:
            row_scale.div_(both[1].sqrt_().add_(ROW_NORM_EPS)).mul_(strength)
        else:  # filter_std: divided by the square root of the (global) row length
            row_scale.mul_(strength / math.sqrt(max(1, slot.span[0] // rows) if len(slot.global_shape) > 1 else 1))
        multiplier = torch.empty_like(clean)
        for low in range(0, clean.numel(), ROW_ID_CHUNK):
            high = min(clean.numel(), low + ROW_ID_CHUNK)
            ids = _row_ids(start + low, start + high, inner, rows, clean.device)
            multiplier[low:high] = row_scale.index_select(0, ids)
        return multiplier

    def release_copies(self, slots: list[Slot]) -> None:
        gathered = [s.param for s in slots if s.flat is not None and _is_gathered(s.param)]
        if gathered:  # frees the gathered data only; the slices stay (has_been_updated=False)
            gathered[0].partition(param_list=gathered)


def _row_ids(low: int, high: int, inner: int, rows: int, device: torch.device) -> torch.Tensor:
    """The output row of each flat element in ``[low, high)`` of a weight with ``rows`` rows of stride ``inner``."""
    return torch.arange(low, high, device=device).div_(inner, rounding_mode="floor").remainder_(rows)


def _is_gathered(param: Any) -> bool:
    status = getattr(param, "ds_status", None)
    return status is not None and getattr(status, "name", "") == "AVAILABLE"
