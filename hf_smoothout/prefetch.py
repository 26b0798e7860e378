"""Draw the next micro-batch's random numbers on a background thread while this one computes (CPU).

On CPU the engine's cost per micro-batch is mostly the random numbers (one per selected weight). For a
small model trained in many micro-batches (the paper's ghost batches: 32 chunks of 128 per step) the
forward and backward pass of one chunk leave a core partly idle, so `NoisePrefetcher` fills buffers
with the raw draws ``u`` of the *next* draw index there, and the next ``perturb`` only combines them
with the weights. The draws are the same numbers a synchronous draw would make (the same seeds from
`hf_smoothout.seeding`), so results do not change; the cost is one more buffer the size of the selected
parameters. The background thread writes only into those buffers, never into weights, so an interrupt
or an error anywhere leaves the weights as safe as without it.

Example:
    >>> import torch
    >>> from hf_smoothout.prefetch import NoisePrefetcher
    >>> target = torch.zeros(4)
    >>> prefetcher = NoisePrefetcher([target])
    >>> prefetcher.start(("seed", 1), lambda buffers: buffers[0].fill_(7.0))
    >>> prefetcher.take(("seed", 1))[0].tolist()
    [7.0, 7.0, 7.0, 7.0]
    >>> prefetcher.take(("seed", 2)) is None  # nothing was prefetched for that draw
    True
    >>> prefetcher.close()
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .threads import _wait_for_all


class NoisePrefetcher:
    """One background thread and one buffer per tensor of ``like``, filled for a tagged draw ahead of time.

    Args:
        like: tensors whose shape, dtype and device the buffers take (the selected parameters).
    """

    def __init__(self, like: list[torch.Tensor]) -> None:
        self.buffers = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in like]
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[object] | None = None
        self._pending_tag: Hashable | None = None
        self._filled: Hashable | None = None  # tag of the draw the buffers hold, once its fill succeeded

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def start(self, tag: Hashable, fill: Callable[[list[torch.Tensor]], object]) -> None:
        """Run ``fill(buffers)`` on the background thread for the draw named ``tag`` (after any pending one)."""
        self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smoothout-prefetch")
        self._filled = None
        self._pending_tag = tag
        self._pending = self._pool.submit(fill, self.buffers)

    def take(self, tag: Hashable) -> list[torch.Tensor] | None:
        """The filled buffers if they hold the draw ``tag``, else ``None`` (draw it yourself).

        Waits for a pending fill either way. The buffers stay valid until the next `start`; a draw is
        taken once.
        """
        self.wait()
        if self._filled is None or self._filled != tag:
            return None
        self._filled = None
        return self.buffers

    def wait(self) -> None:
        """Block until no fill runs (interrupt-safe: a Ctrl-C meanwhile is raised once it has stopped).

        A fill that failed leaves nothing to take (its error is dropped: the synchronous draw repeats it).
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return
        interrupt = _wait_for_all([pending], None, None)
        if interrupt is not None:
            raise interrupt
        self._filled = self._pending_tag if pending.exception() is None else None

    def close(self) -> None:
        """Wait for a running fill and stop the thread (`start` starts it again)."""
        self.wait()
        self._filled = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
