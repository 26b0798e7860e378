"""The `Placement` protocol: where a selected parameter's values live, and what a back-end needs around a draw.

A placement answers, for one engine: which tensor holds a parameter's values on this rank (`live`), how a
`Slot` is laid out (`slot`: local shard, global row span, process groups splitting its rows), how a slot's raw
draw is made (`draw_`: from the stream's generator, or per block of global rows), which rank's noise to draw
(`noise_rank`), how the ranks agree on a check (`agree`), what it refuses (`check`, `check_layout`) and what it
installs (`attach`: DeepSpeed's step guard) or requires before a draw (`check_before_perturb`).

Example:
    >>> from hf_smoothout.placement import get_placement
    >>> get_placement("local").noise_rank(rank=3, independent_ranks=False)
    0
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from .. import noise
from ..plan import Slot
from ..seeding import draw_row_blocks_

if TYPE_CHECKING:
    from ..config import SmoothOutConfig
    from ..plan import Stream
    from ..seeding import DrawKey
    from ..selection import SelectedParameter


def all_ranks_agree(flag: bool, device: torch.device, world_size: int) -> bool:
    """``flag`` if every rank says so (one all-reduce when several processes run), else ``False`` everywhere."""
    if world_size > 1 and torch.distributed.is_initialized():
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)  # every rank decides alike
        return bool(value.item() == 1.0)
    return flag


class Placement:
    """Plain tensors, one whole copy per rank (single process, DDP): the base every placement refines.

    Args:
        rank: this process's rank.
        world_size: number of processes.
    """

    name: ClassVar[str] = "local"

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        self.rank = rank
        self.world_size = world_size

    @classmethod
    def applies(cls, model: nn.Module, selected: list[SelectedParameter]) -> bool:
        """Whether this placement describes how ``model``'s ``selected`` parameters are stored."""
        return True

    def check(self, config: SmoothOutConfig, selected: list[SelectedParameter]) -> None:
        """Refuse settings this placement cannot run (at construction), with what to do instead."""

    def check_layout(self, model: nn.Module, selected: list[SelectedParameter]) -> None:
        """Refuse a storage layout this placement cannot perturb exactly (at every (re)allocation)."""

    def attach(self, engine: Any) -> None:
        """Install what the back-end needs on the engine at construction (DeepSpeed: the step guard)."""

    def check_before_perturb(self, slots: list[Slot], *, step_guarded: bool) -> None:
        """Refuse to draw when the back-end would undo or corrupt the window (before any weight is written)."""

    def swap_blocker(self) -> str | None:
        """Why ``restore="auto"`` may never swap under this placement, or ``None``."""
        return None

    def live(self, param: nn.Parameter) -> torch.Tensor:
        """The tensor that holds ``param``'s values on this rank now (its storage and version counter)."""
        return param

    def slot(self, selected: SelectedParameter, index: int, *, row_scaled: bool) -> Slot:
        """The `Slot` of one selected parameter (its buffers are added by `hf_smoothout.plan.build_plan`)."""
        p = selected.param
        return Slot(selected.name, p, selected.row_axis, p.data, selected.module, selected.local_name, index=index)

    def noise_rank(self, rank: int, independent_ranks: bool) -> int:
        """The rank whose noise this process draws: its own with ``independent_ranks``, else rank 0's."""
        return rank if independent_ranks else 0

    def draw_(self, slot: Slot, out: torch.Tensor, stream: Stream, key: DrawKey) -> None:
        """Fill ``out`` (the size of ``slot``'s local values) with the slot's raw draw ``u``."""
        noise.draw_(out, key.distribution, stream.generator)

    def agree(self, flag: bool, device: torch.device) -> bool:
        """``flag`` as every rank must see it (plain tensors: each rank decides alone)."""
        return flag

    def release_copies(self, slots: list[Slot]) -> None:
        """The slots' values just changed (noise in or out): drop any copy of them the back-end keeps gathered, so
        that the next forward reads the current values (ZeRO-3). Plain tensors: nothing to drop."""

    @staticmethod
    def draw_global_blocks_(
        slot: Slot, out: torch.Tensor, stream: Stream, key: DrawKey, global_shape: tuple[int, ...]
    ) -> None:
        """Fill ``out`` with the slot's part (``slot.span``) of a tensor of ``global_shape`` drawn per block of
        global rows from rank-free seeds (`hf_smoothout.seeding.draw_row_blocks_`): the same values whatever the
        number of ranks holding the rest (FSDP2 dim-0 shards, ZeRO-3 flat slices)."""
        assert slot.span is not None
        if stream.block_generator is None:
            stream.block_generator = torch.Generator(device=stream.device)
        seed = key.row_block_seed(slot.index)
        draw_row_blocks_(
            out, slot.span, global_shape, seed, key.distribution, stream.block_scratch_for, stream.block_generator
        )

    def split_row_scales(
        self,
        slots: list[Slot],
        cleans: list[torch.Tensor],
        draws: list[torch.Tensor],
        strength: float,
        *,
        normalize: bool = True,
    ) -> list[torch.Tensor]:
        """`split_row_scale` of several slots (a placement may batch their collectives)."""
        return [
            self.split_row_scale(slot, clean, draw, strength, normalize=normalize)
            for slot, clean, draw in zip(slots, cleans, draws, strict=True)
        ]

    def split_row_scale(
        self, slot: Slot, clean: torch.Tensor, draw: torch.Tensor, strength: float, *, normalize: bool = True
    ) -> torch.Tensor:
        """The per-row multiplier of a row-scaled law for a slot whose rows are split across ranks."""
        raise NotImplementedError(f"the {self.name!r} placement never splits a row across ranks")
