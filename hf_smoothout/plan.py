"""How the engine lays its work out: one `Slot` per selected parameter, `Stream`\\ s of slots that draw from one
generator, and the `Plan` that groups them by device, dtype and layout and holds their buffers.

The selected parameters are grouped by ``(device, dtype, rows split across ranks)``, and each group is split into
a fixed number of noise streams balanced by size (`streams_for`, a function of the model alone: the noise never
depends on the thread count). Which buffers a plan holds depends on the restore strategy (a second buffer per
weight for copy and swap, a small scratch per worker for the in-place paths) and on the law (per-row norm buffers).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from hf_smoothout import SmoothOutConfig
    >>> from hf_smoothout.selection import select_parameters
    >>> from hf_smoothout.placement import get_placement
    >>> model = nn.Linear(8, 4)
    >>> selected = select_parameters(model, SmoothOutConfig())
    >>> plan = build_plan(selected, get_placement("local"), second_buffer=True, row_scaled=True, num_threads=1)
    >>> [s.name for s in plan.slots], len(plan.streams), plan.workers
    (['weight', 'bias'], 1, 1)
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .noise import row_length, row_norm_buffers

if TYPE_CHECKING:
    from .placement.base import Placement
    from .selection import SelectedParameter

STREAMS_PER_GROUP = 8
"""Most noise streams per (device, dtype) group."""
ELEMENTS_PER_STREAM = 1 << 20
"""A group gets one stream per this many elements (1 to `STREAMS_PER_GROUP`): a function of the model alone, so
the noise never depends on the thread count, and small models do not pay for seeding 8 generators per draw."""
MIN_PARALLEL_ELEMENTS = 1 << 22
"""Below this many selected CPU elements, thread dispatch costs more than it saves: one worker."""
MAX_SCRATCH_WORKERS = 2
"""Most workers of the in-place (scratch) paths."""
# Scratch buffer of the in-place paths, per worker: at least one whole row, at most this many elements, and about
# 1/128 of the group's parameters in between.
_MAX_SCRATCH_ELEMENTS = 1 << 20
_MIN_SCRATCH_ELEMENTS = 1 << 14
_SCRATCH_FRACTION = 128


def streams_for(numel: int) -> int:
    """Noise streams of a (device, dtype) group of ``numel`` weights.

    Example:
        >>> streams_for(1_460_000), streams_for(110_000_000)
        (2, 8)
    """
    return max(1, min(STREAMS_PER_GROUP, -(-numel // ELEMENTS_PER_STREAM)))


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class Slot:
    """One selected parameter with its preallocated buffers."""

    name: str
    param: nn.Parameter
    row_axis: int
    data: torch.Tensor  # the parameter's tensor when the buffers were built (keeps that storage alive)
    module: nn.Module | None = None
    local_name: str = ""
    backup: torch.Tensor | None = None  # copy: the clean values while noisy; swap: the noisy values
    held: torch.Tensor | None = None  # copy restore, suspended window: the noisy values until resume
    norms: tuple[torch.Tensor, torch.Tensor] | None = None
    reduce_groups: tuple[Any, ...] = ()  # process groups splitting this parameter's rows (sharded, row-scaled)
    index: int = 0  # position among the selected parameters (model order): names its sharded noise
    span: tuple[int, int, int] | None = None  # FSDP2 dim-0 shard: (global rows, first row here, rows here)
    global_shape: tuple[int, ...] = ()
    flat: tuple[int, int] | None = None  # ZeRO-3 flat slice (its elements in span): (row stride, rows)


@dataclass
class Stream:
    """Parameters of one device and dtype that draw, in a fixed order, from one generator."""

    device: torch.device
    dtype: torch.dtype
    generator: torch.Generator | np.random.Generator
    stream_id: int
    slots: list[Slot] = field(default_factory=list)
    chunks_done: int = 0
    collective: bool = False  # all-reduces row norms: drawn in the calling thread, in the same order on all ranks
    block_generator: torch.Generator | None = None  # sharded row blocks (their seeds do not involve the rank)
    block_scratch: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        return sum(s.data.numel() for s in self.slots)

    def block_scratch_for(self, numel: int) -> torch.Tensor:
        """A scratch of ``numel`` elements of this stream's device and dtype (grown on demand, kept)."""
        if self.block_scratch is None or self.block_scratch.numel() < numel:
            self.block_scratch = torch.empty(numel, device=self.device, dtype=self.dtype)
        return self.block_scratch[:numel]


@dataclass
class Plan:
    """The slots, their groups and streams, and the buffers of one engine, for the parameters' current storage."""

    slots: list[Slot]
    groups: list[list[Slot]]  # one per (device, dtype, rows split across ranks), in model order
    streams: list[Stream]
    workers: int  # worker threads drawing CPU streams
    scratch: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]  # in-place paths: one per worker
    pairs: list[tuple[list[torch.Tensor], list[torch.Tensor]]]  # per group: (weights, second buffers)

    @property
    def cpu_numel(self) -> int:
        return sum(s.data.numel() for s in self.slots if s.data.device.type == "cpu")

    def buffers(self) -> list[torch.Tensor]:
        """Every buffer the plan holds (second buffers, held noise, per-row norms, scratch)."""
        tensors = [t for bufs in self.scratch.values() for t in bufs]
        tensors.extend(s.block_scratch for s in self.streams if s.block_scratch is not None)
        for slot in self.slots:
            tensors.extend(t for t in (slot.backup, slot.held, *(slot.norms or ())) if t is not None)
        return tensors


def balanced_split(slots: list[Slot], parts: int) -> list[list[Slot]]:
    """Split ``slots`` into at most ``parts`` lists of similar total size, each in model order."""
    order = {id(s): i for i, s in enumerate(slots)}
    bins: list[list[Slot]] = [[] for _ in range(min(parts, len(slots)))]
    loads = [0] * len(bins)
    for slot in sorted(slots, key=lambda s: -s.data.numel()):
        i = loads.index(min(loads))
        bins[i].append(slot)
        loads[i] += slot.data.numel()
    return [sorted(b, key=lambda s: order[id(s)]) for b in bins if b]


def build_plan(
    selected: Sequence[SelectedParameter],
    placement: Placement,
    *,
    second_buffer: bool,
    row_scaled: bool,
    num_threads: int,
    enabled: bool = True,
) -> Plan:
    """Slots, groups, streams and buffers for ``selected`` as they are stored now.

    ``second_buffer``: one more tensor per weight (copy and swap restores), else a scratch per worker for the
    in-place paths; ``row_scaled``: per-row norm buffers. Nothing is allocated when ``enabled`` is false.
    """
    groups: dict[tuple[torch.device, torch.dtype, bool], list[Slot]] = {}
    slots = []
    for index, sel in enumerate(selected):
        slot = placement.slot(sel, index, row_scaled=enabled and row_scaled)
        if enabled and second_buffer:
            slot.backup = torch.empty_like(slot.data, memory_format=torch.contiguous_format)
        if enabled and row_scaled and slot.norms is None:  # a placement may size them itself (ZeRO-3: per row)
            slot.norms = row_norm_buffers(slot.data, sel.row_axis)
        groups.setdefault((sel.param.device, sel.param.dtype, bool(slot.reduce_groups)), []).append(slot)
        slots.append(slot)

    cpu = [(key, members) for key, members in groups.items() if key[0].type == "cpu"]
    cpu_numel = sum(s.data.numel() for _, members in cpu for s in members)
    cpu_streams = sum(min(len(members), streams_for(sum(s.data.numel() for s in members))) for _, members in cpu)
    workers = 1 if cpu_numel < MIN_PARALLEL_ELEMENTS else max(1, min(num_threads, cpu_streams))
    if enabled and not second_buffer:
        workers = min(workers, MAX_SCRATCH_WORKERS)
    streams: list[Stream] = []
    pairs: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
    scratch: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for (device, dtype, collective), members in groups.items():
        for part in balanced_split(members, streams_for(sum(s.data.numel() for s in members))):
            generator = torch.Generator(device=device)
            streams.append(Stream(device, dtype, generator, len(streams), part, collective=collective))
        if enabled and second_buffer:
            pairs.append(([s.data for s in members], [s.backup for s in members]))  # type: ignore[misc]
        if enabled and not second_buffer:
            total = sum(s.data.numel() for s in members)
            largest_row = max(row_length(s.data, s.row_axis) for s in members)
            size = max(largest_row, min(_MAX_SCRATCH_ELEMENTS, max(_MIN_SCRATCH_ELEMENTS, total // _SCRATCH_FRACTION)))
            count = workers if device.type == "cpu" else 1
            scratch[(device, dtype)] = [torch.empty(size, device=device, dtype=dtype) for _ in range(count)]
    return Plan(slots, list(groups.values()), streams, workers, scratch, pairs)


def chunks(
    stream: Stream, scratch: torch.Tensor
) -> Iterator[tuple[Slot, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]]:
    """Split every parameter of ``stream`` into whole-row chunks that fit ``scratch``.

    Yields ``(slot, weight_chunk, scratch_view, norm_buffer_chunks)``. The order and sizes are a
    function of the stream and the scratch size only, so a regenerating pass sees the same chunks
    and the same random numbers as the drawing pass.
    """
    capacity = scratch.numel()
    for slot in stream.slots:
        weight = slot.data
        if weight.ndim == 0:
            yield slot, weight, scratch[:1].view(()), slot.norms
            continue
        axis = slot.row_axis if weight.ndim > 1 else 0
        rows = weight.shape[axis]
        rows_per_chunk = max(1, capacity // row_length(weight, axis))
        for start in range(0, rows, rows_per_chunk):
            length = min(rows_per_chunk, rows - start)
            weight_chunk = weight.narrow(axis, start, length)
            draw = scratch[: weight_chunk.numel()].view(weight_chunk.shape)
            norms = None
            if slot.norms is not None:
                norms = (slot.norms[0].narrow(axis, start, length), slot.norms[1].narrow(axis, start, length))
            yield slot, weight_chunk, draw, norms
