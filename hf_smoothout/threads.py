"""Run per-stream work on worker threads, interrupt-safely.

The engine draws CPU noise streams on worker threads. The one rule that matters for correctness:
the caller must not touch the weights again (restore them, raise to the user) while any worker may
still be writing into them. `StreamRunner.run` therefore returns or raises only after every task
has stopped, also when the waiting thread is interrupted (Ctrl-C arrives as ``KeyboardInterrupt``
in the main thread, typically while it waits on the workers). On an interrupt, cancellable work is
told to stop at its next task boundary, the interrupt is held until all workers are idle, and then
re-raised; further interrupts during that wait are swallowed, not lost: the first one is raised.
`interrupts_deferred` holds Ctrl-C back over a block that must finish once started (e.g. removing
regenerated noise chunk by chunk in the main thread).

Example:
    >>> runner = StreamRunner(workers=2)
    >>> out = []
    >>> runner.run([[1, 2], [3]], lambda item, worker: out.append(item * 10))
    >>> sorted(out)
    [10, 20, 30]
    >>> runner.close()
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Generic, TypeVar

Item = TypeVar("Item")


class StreamRunner(Generic[Item]):
    """Runs ``work(item, worker)`` for lists of items, one list per worker thread.

    Args:
        workers: worker threads (created lazily; ``1`` runs everything in the calling thread).
        thread_name_prefix: name prefix of the worker threads.
    """

    def __init__(self, workers: int, thread_name_prefix: str = "smoothout") -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}.")
        self.workers = workers
        self._prefix = thread_name_prefix
        self._pool: ThreadPoolExecutor | None = None

    def run(
        self,
        loads: Sequence[Sequence[Item]],
        work: Callable[[Item, int], None],
        *,
        inline: Sequence[Item] = (),
        cancellable: bool = False,
    ) -> None:
        """Run ``work`` on every item of ``loads[i]`` in worker thread ``i``, and on ``inline`` in this thread.

        Every item runs even if another fails (unless cancelled); the first error is raised once all
        workers have stopped. With ``cancellable=True`` an error or interrupt in this thread makes the
        workers skip their remaining items (use it for work that the caller undoes anyway).

        Raises:
            BaseException: the first error of any item, or the interrupt this thread received.
        """
        errors: list[BaseException] = []
        cancel = threading.Event()

        def run_all(items: Sequence[Item], worker: int) -> None:
            for item in items:
                if cancel.is_set():
                    return
                try:
                    work(item, worker)
                except BaseException as err:  # collected, re-raised by the caller's thread
                    errors.append(err)
                    if cancellable:
                        cancel.set()

        if self.workers == 1 or len(loads) <= 1:
            run_all([item for load in loads for item in load] + list(inline), 0)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=self._prefix)
            futures: list[Future[None]] = []
            interrupt: BaseException | None = None
            try:
                for i, load in enumerate(loads):
                    futures.append(self._pool.submit(run_all, load, i))
                run_all(inline, 0)
            except BaseException as err:  # an interrupt while submitting: still wait for every worker
                interrupt = err
                if cancellable:
                    cancel.set()
            interrupt = _wait_for_all(futures, cancel if cancellable else None, interrupt)
            if interrupt is not None and not cancellable and len(futures) < len(loads):
                for i, load in enumerate(loads[len(futures) :], start=len(futures)):
                    run_all(load, i)  # work that must complete: finish what was never submitted
            if interrupt is not None:
                raise interrupt
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Stop the worker threads (waits for running tasks)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)


def _wait_for_all(
    futures: list[Future[None]], cancel: threading.Event | None, interrupt: BaseException | None
) -> BaseException | None:
    """Block until every future is done, whatever this thread receives meanwhile; returns the first interrupt."""
    while True:
        try:
            wait_futures(futures)
            return interrupt
        except BaseException as err:  # KeyboardInterrupt or a signal handler's exception: keep waiting
            if interrupt is None:
                interrupt = err
            if cancel is not None:
                cancel.set()


class DeferredInterrupts:
    """What `interrupts_deferred` caught: ``pending`` is true once a SIGINT arrived inside the block."""

    def __init__(self) -> None:
        self.received: list[tuple[int, object]] = []

    @property
    def pending(self) -> bool:
        return bool(self.received)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[DeferredInterrupts]:
    """Hold SIGINT back while the block runs, then deliver it (``KeyboardInterrupt``) once the block is done.

    Yields a `DeferredInterrupts` whose ``pending`` tells the block that an interrupt is waiting (so it
    can leave things clean before it is raised). Only the main thread receives signals in Python, so
    elsewhere (or when SIGINT has no Python handler) nothing is deferred. Nested blocks pass a held
    interrupt on to the enclosing one.

    Example:
        >>> with interrupts_deferred() as deferred:
        ...     total = sum(range(10))
        >>> total, deferred.pending
        (45, False)
    """
    deferred = DeferredInterrupts()
    if threading.current_thread() is not threading.main_thread():
        yield deferred
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):
        yield deferred
        return
    signal.signal(signal.SIGINT, lambda signum, frame: deferred.received.append((signum, frame)))
    try:
        yield deferred
    finally:
        signal.signal(signal.SIGINT, previous)
        if deferred.received:
            previous(*deferred.received[0])
