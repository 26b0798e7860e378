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
from ..seeding import DrawKey
from ..selection import SelectedParameter, logical_shape
from .base import all_ranks_agree
from .deepspeed import DeepSpeedPlacement


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
        slot.span, slot.global_shape, slot.flat = (int(p.ds_numel), start, held), tuple(shape), (inner, rows)
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
        assert slot.span is not None
        self.draw_global_blocks_(slot, out, stream, key, (slot.span[0],))  # blocks of the flattened weight's elements

    def agree(self, flag: bool, device: torch.device) -> bool:
        return all_ranks_agree(flag, device, self.world_size)

    def split_row_scales(
        self,
        slots: list[Slot],
        cleans: list[torch.Tensor],
        draws: list[torch.Tensor],
        strength: float,
        *,
        normalize: bool = True,
    ) -> list[torch.Tensor]:
        """Per-element multipliers of every slot: each element's (global) row scale, from segment sums of this rank's
        slices completed by one all-reduce per process group for all the slots together."""
        for slot, clean, draw in zip(slots, cleans, draws, strict=True):
            self._partial_row_sums(slot, clean, draw)
        by_group: dict[int, list[Slot]] = {}
        for slot in slots:
            by_group.setdefault(id(slot.reduce_groups[0]), []).append(slot)
        for members in by_group.values():
            flat = torch.cat([t for slot in members for t in slot.norms])  # type: ignore[union-attr]
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(flat, group=members[0].reduce_groups[0])
            offset = 0
            for slot in members:
                for t in slot.norms:  # type: ignore[union-attr]
                    t.copy_(flat[offset : offset + t.numel()])
                    offset += t.numel()
        return [self._multiplier(slot, clean, strength, normalize) for slot, clean in zip(slots, cleans, strict=True)]

    def split_row_scale(
        self, slot: Slot, clean: torch.Tensor, draw: torch.Tensor, strength: float, *, normalize: bool = True
    ) -> torch.Tensor:
        """A per-element multiplier: the row scale of each element's (global) row, from all-reduced segment sums."""
        return self.split_row_scales([slot], [clean], [draw], strength, normalize=normalize)[0]

    @staticmethod
    def _partial_row_sums(slot: Slot, clean: torch.Tensor, draw: torch.Tensor) -> None:
        """This rank's per-row sums of squares of the weight and the draw, into ``slot.norms``."""
        assert slot.flat is not None and slot.norms is not None and slot.span is not None
        (inner, rows), start = slot.flat, slot.span[1]
        for source, out in zip((clean, draw), slot.norms, strict=True):
            out.zero_()
            for low, high, first, blocks in row_pieces(start, clean.numel(), inner):
                block_sums = source[low:high].view(blocks, -1).float().square().sum(dim=1)
                accumulate_rows_(out, block_sums, first, rows)

    @staticmethod
    def _multiplier(slot: Slot, clean: torch.Tensor, strength: float, normalize: bool) -> torch.Tensor:
        """Each element's row scale, from the completed (all-reduced) row sums in ``slot.norms``."""
        assert slot.flat is not None and slot.norms is not None and slot.span is not None
        (inner, rows), start = slot.flat, slot.span[1]
        sums, draw_sums = slot.norms
        row_scale = sums.sqrt()
        if normalize:
            row_scale.div_(draw_sums.sqrt().add_(ROW_NORM_EPS)).mul_(strength)
        else:  # filter_std: divided by the square root of the (global) row length
            row_scale.mul_(strength / math.sqrt(max(1, slot.span[0] // rows) if len(slot.global_shape) > 1 else 1))
        row_scale = row_scale.to(clean.dtype)
        multiplier = torch.empty_like(clean)
        for low, high, first, blocks in row_pieces(start, clean.numel(), inner):
            multiplier[low:high].view(blocks, -1).copy_(spread_rows(row_scale, first, blocks, rows).unsqueeze(1))
        return multiplier

    def release_copies(self, slots: list[Slot]) -> None:
        gathered = [s.param for s in slots if s.flat is not None and _is_gathered(s.param)]
        if gathered:  # frees the gathered data only; the slices stay (has_been_updated=False)
            gathered[0].partition(param_list=gathered)


def row_pieces(start: int, count: int, inner: int) -> list[tuple[int, int, int, int]]:
    """The slice ``[start, start + count)`` of a flattened weight whose rows have stride ``inner``, cut into pieces
    of whole blocks of ``inner`` elements (each block lies in one row): ``(local low, local high, first global
    block, blocks)``; the partial blocks at either end are pieces of one block.

    Example:
        >>> row_pieces(5, 20, 8)  # elements 5-24 of rows of 8: 3 of block 0, blocks 1-2, 1 of block 3
        [(0, 3, 0, 1), (3, 19, 1, 2), (19, 20, 3, 1)]
    """
    pieces, low = [], 0
    head = min(count, (-start) % inner)
    if head:
        pieces.append((0, head, start // inner, 1))
        low = head
    full = (count - low) // inner
    if full:
        pieces.append((low, low + full * inner, (start + low) // inner, full))
        low += full * inner
    if low < count:
        pieces.append((low, count, (start + low) // inner, 1))
    return pieces


def accumulate_rows_(out: torch.Tensor, values: torch.Tensor, first: int, rows: int) -> None:
    """``out[(first + j) % rows] += values[j]`` for every ``j``, by slices (no index tensor).

    Example:
        >>> out = torch.zeros(3)
        >>> accumulate_rows_(out, torch.ones(7), first=2, rows=3); out
        tensor([2., 2., 3.])
    """
    offset, n = first % rows, values.numel()
    head = min(n, rows - offset)
    out[offset : offset + head] += values[:head]
    rest = values[head:]
    periods = rest.numel() // rows
    if periods:
        out += rest[: periods * rows].view(periods, rows).sum(dim=0)
    tail = rest[periods * rows :]
    if tail.numel():
        out[: tail.numel()] += tail


def spread_rows(row_values: torch.Tensor, first: int, n: int, rows: int) -> torch.Tensor:
    """``row_values[(first + j) % rows]`` for ``j`` in ``range(n)``, by slices.

    Example:
        >>> spread_rows(torch.tensor([10.0, 20.0, 30.0]), first=2, n=5, rows=3)
        tensor([30., 10., 20., 30., 10.])
    """
    offset = first % rows
    head = min(n, rows - offset)
    parts = [row_values[offset : offset + head]]
    periods, tail = divmod(n - head, rows)
    if periods:
        parts.append(row_values.repeat(periods))
    if tail:
        parts.append(row_values[:tail])
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _is_gathered(param: Any) -> bool:
    status = getattr(param, "ds_status", None)
    return status is not None and getattr(status, "name", "") == "AVAILABLE"
