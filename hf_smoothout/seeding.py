"""Where every noise draw's random numbers come from: a pure function of ``(seed, rank, stream, draw)``.

Before each draw a stream's generator is seeded from `derive_seed`, so the noise does not depend on the
thread count or on what was drawn before, a restore can regenerate a draw without saved generator states,
and a checkpoint needs only the draw index.

Example:
    >>> import torch
    >>> g = seeded_generator(derive_seed(7, rank=0, stream=2, draw=3), torch.device("cpu"), torch.float64, "gaussian")
    >>> isinstance(g, torch.Generator)
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .noise import NUMPY_DTYPES

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class StreamRange:
    """A namespace of noise-stream ids: ids ``start .. start + size - 1``, one per index of what it names.

    Every stream id any draw is seeded with comes from one of the ranges in `STREAM_RANGES`, which never overlap
    (two users of one id would draw the same numbers: a silent correlation).

    Example:
        >>> ROW_BLOCK_STREAMS.id(3) - ROW_BLOCK_STREAMS.start
        3
    """

    name: str
    start: int
    size: int

    def id(self, index: int) -> int:
        if not 0 <= index < self.size:
            raise ValueError(f"Noise stream index {index} outside the {self.name!r} range (0..{self.size - 1}).")
        return self.start + index


ENGINE_STREAMS = StreamRange("engine", 0, 1 << 32)
"""The engine's streams: one per balanced part of a (device, dtype) group of parameters, in build order."""
MERGED_LAYER_STREAMS = StreamRange("lora_merged", 1 << 32, (1 << 40) - (1 << 32))
"""``space="lora_merged"``: one stream per LoRA layer, by its index in model order."""
ROW_BLOCK_STREAMS = StreamRange("row_blocks", 1 << 40, 1 << 40)
"""FSDP2 dim-0 shards: global row blocks of a parameter (by its index among the selected), seeded without rank."""
FUSED_STREAMS = StreamRange("fused", 1 << 41, 1 << 32)
"""The fused (Triton) kernel: one counter-based stream per selected parameter, by its index; element ``i`` of the
parameter (in row-major order of its rows) draws from counter ``i`` of that stream."""
STREAM_RANGES = (ENGINE_STREAMS, MERGED_LAYER_STREAMS, ROW_BLOCK_STREAMS, FUSED_STREAMS)


def _splitmix64(x: int) -> int:
    """One round of the SplitMix64 finalizer: a well-mixed 64-bit hash of ``x``."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(base_seed: int, rank: int, stream: int = 0, draw: int = 0) -> int:
    """Seed of draw number ``draw`` of noise stream ``stream`` on ``rank`` (a 63-bit integer).

    Example:
        >>> derive_seed(42, rank=0) != derive_seed(42, rank=1)
        True
        >>> derive_seed(42, 0, stream=1, draw=5) == derive_seed(42, 0, stream=1, draw=5)
        True
    """
    h = _splitmix64(int(base_seed) & _MASK64)
    for part in (rank, stream, draw):
        h = _splitmix64(h ^ (int(part) & _MASK64))
    return h >> 1


def uses_numpy(device: torch.device, dtype: torch.dtype, distribution: str) -> bool:
    """Whether draws for ``device``/``dtype`` come from numpy's PCG64 (uniform noise in CPU float32/float64).

    numpy fills uniform float32 faster than torch's CPU mt19937 (2.0 vs 3.0 ms per 1.46M numbers); its float32
    normals are slower than torch's ``normal_`` (11.2 vs 3.4 ms), so Gaussian noise stays on torch.
    """
    return device.type == "cpu" and dtype in NUMPY_DTYPES and distribution == "uniform"


def seeded_generator(
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    distribution: str,
    generator: torch.Generator | None = None,
) -> torch.Generator | np.random.Generator:
    """A generator for one draw, seeded with ``seed``: numpy's PCG64 where `uses_numpy`, else ``generator``
    (a ``torch.Generator`` on ``device``, created when not given) re-seeded in place.
    """
    if uses_numpy(device, dtype, distribution):
        return np.random.Generator(np.random.PCG64(seed))
    if generator is None:
        generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass(frozen=True)
class DrawKey:
    """What one noise draw's numbers are a function of: the run's seed, the drawing rank, the draw index and the
    distribution. Every engine stream and row block is seeded from it (the regenerate restore, `resume` and a
    prefetched draw rebuild the same numbers from the same key).

    Example:
        >>> key = DrawKey(base_seed=7, rank=0, draw=3, distribution="uniform")
        >>> key.stream_seed(2) == derive_seed(7, 0, ENGINE_STREAMS.id(2), 3)
        True
        >>> key.row_block_seed(1) == DrawKey(7, 5, 3, "uniform").row_block_seed(1)  # row blocks: rank-free
        True
    """

    base_seed: int
    rank: int
    draw: int
    distribution: str

    def stream_seed(self, stream_id: int) -> int:
        """Seed of engine stream ``stream_id`` for this draw."""
        return derive_seed(self.base_seed, self.rank, ENGINE_STREAMS.id(stream_id), self.draw)

    def row_block_seed(self, index: int) -> int:
        """Seed of the global row blocks of the ``index``-th selected parameter (no rank: any shard count)."""
        return derive_seed(self.base_seed, 0, ROW_BLOCK_STREAMS.id(index), self.draw)

    def fused_seed(self, index: int) -> int:
        """Philox key of the ``index``-th selected parameter for this draw (63 bits: a signed 64-bit argument)."""
        return derive_seed(self.base_seed, self.rank, FUSED_STREAMS.id(index), self.draw) & ((1 << 63) - 1)

    def generator(
        self,
        stream_id: int,
        device: torch.device,
        dtype: torch.dtype,
        reuse: torch.Generator | np.random.Generator | None = None,
    ) -> torch.Generator | np.random.Generator:
        """Stream ``stream_id``'s generator seeded for this draw (``reuse``: a torch generator to re-seed)."""
        torch_generator = reuse if isinstance(reuse, torch.Generator) else None
        return seeded_generator(self.stream_seed(stream_id), device, dtype, self.distribution, torch_generator)


ROW_BLOCK_ELEMENTS = 1 << 18
"""Elements per block of global rows in `draw_row_blocks_` (at least one row per block)."""


def row_block_rows(global_shape: tuple[int, ...]) -> int:
    """Rows of dim 0 per block for a tensor of ``global_shape``: a function of the global shape only.

    Example:
        >>> row_block_rows((30522, 768)), row_block_rows((768,))
        (341, 262144)
    """
    row = 1
    for size in global_shape[1:]:
        row *= int(size)
    return max(1, ROW_BLOCK_ELEMENTS // max(1, row))


def draw_row_blocks_(
    local: torch.Tensor,
    span: tuple[int, int, int],
    global_shape: tuple[int, ...],
    seed: int,
    distribution: str,
    scratch: Callable[[int], torch.Tensor],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fill ``local``, the rows ``[start, start + count)`` of dim 0 of a tensor of ``global_shape``
    (``span = (rows, start, count)``), with the noise of those global rows.

    Block ``b`` of `row_block_rows` rows draws from ``derive_seed(seed, b)`` (``seed`` already names the tensor
    and the draw, not the rank), so the values of a global row are the same whatever the rows held locally:
    the noise does not depend on the shard count. Blocks that straddle the shard's edges are drawn whole
    into ``scratch(numel)`` and the held part copied. ``draw_`` comes from `hf_smoothout.noise`.
    """
    from .noise import draw_

    rows, start, count = span
    if count == 0:
        return local
    per_block = row_block_rows(global_shape)
    row_shape = tuple(local.shape[1:])
    for block in range(start // per_block, (start + count - 1) // per_block + 1):
        first, last = block * per_block, min((block + 1) * per_block, rows)
        low, high = max(first, start), min(last, start + count)
        block_generator = seeded_generator(derive_seed(seed, block), local.device, local.dtype, distribution, generator)
        if low == first and high == last:
            draw_(local[low - start : high - start], distribution, block_generator)
            continue
        whole = scratch((last - first) * max(1, local[0:1].numel())).view((last - first, *row_shape))
        draw_(whole, distribution, block_generator)
        local[low - start : high - start].copy_(whole[low - first : high - first])
    return local
