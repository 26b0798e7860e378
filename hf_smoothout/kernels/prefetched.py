"""Prefetched draws: the next micro-batch's raw numbers drawn on a background thread during this one's forward and
backward pass (CPU, second-buffer restores), then combined with the weights by `apply_law`.

The numbers are those the kernels would draw for the same `DrawKey` (the same stream seeds), so prefetching
changes the speed, never the noise (``tests/test_prefetch.py``). ``prefetch="auto"`` runs it when torch leaves a
core free and the selected weights are at most `AUTO_PREFETCH_ELEMENTS`.

Example:
    >>> from hf_smoothout.kernels.prefetched import AUTO_PREFETCH_ELEMENTS
    >>> AUTO_PREFETCH_ELEMENTS * 4 // 2**20  # MiB of float32
    64
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..plan import Plan, available_cores
from ..prefetch import NoisePrefetcher
from ..restore import RestoreStrategy
from ..seeding import DrawKey
from .base import draw_raw_

AUTO_PREFETCH_ELEMENTS = 1 << 24
"""``prefetch="auto"`` draws ahead for at most this many selected CPU weights (64 MiB in float32)."""


def wants_prefetch(plan: Plan, restore: RestoreStrategy, mode: str) -> bool:
    """Whether a plan prefetches under ``mode`` (``SmoothOutConfig.prefetch``)."""
    spare_core = torch.get_num_threads() < available_cores()  # measured: no gain when torch uses every core
    wanted = mode == "always" or (mode == "auto" and spare_core and plan.cpu_numel <= AUTO_PREFETCH_ELEMENTS)
    all_cpu = bool(plan.streams) and all(s.device.type == "cpu" for s in plan.streams)
    row_blocks = any(slot.span is not None for slot in plan.slots)  # drawn per global row block instead
    return restore.second_buffer and all_cpu and wanted and not row_blocks


class PrefetchedDraws:
    """One buffer per slot of ``plan``, filled on a background thread with a future draw's raw numbers."""

    def __init__(self, plan: Plan) -> None:
        self._prefetcher = NoisePrefetcher([slot.data for slot in plan.slots])
        index = {id(slot): i for i, slot in enumerate(plan.slots)}
        self._streams = [(stream, [index[id(slot)] for slot in stream.slots]) for stream in plan.streams]
        self._generators: dict[int, torch.Generator] = {}

    @property
    def buffers(self) -> list[torch.Tensor]:
        return self._prefetcher.buffers

    def take(self, key: DrawKey) -> list[torch.Tensor] | None:
        """The raw draws of ``key`` if they were prefetched, else ``None``."""
        return self._prefetcher.take(key)

    def start(self, key: DrawKey) -> None:
        """Draw ``key``'s raw numbers on the background thread."""
        self._prefetcher.start(key, self.fill_for(key))

    def fill_for(self, key: DrawKey) -> Callable[[list[torch.Tensor]], None]:
        """The function that fills the buffers with ``key``'s raw numbers (what `start` runs)."""

        def fill(buffers: list[torch.Tensor]) -> None:
            for stream, positions in self._streams:
                own = self._generators.setdefault(stream.stream_id, torch.Generator(device=stream.device))
                generator = key.generator(stream.stream_id, stream.device, stream.dtype, own)
                for position in positions:
                    draw_raw_(buffers[position], key.distribution, generator)

        return fill

    def close(self) -> None:
        self._prefetcher.close()
