"""What an engine runs on for the weights' current storage: placement, restore, plan, kernel, threads, prefetch.

A `Binding` is built when the engine is, and rebuilt (`Binding.rebind_if_moved`) whenever a selected parameter's
storage changed since: a wrapper moved it to another device, dtype or buffer (FSDP2 re-pads a shard at its first
forward). Everything bound here depends on that storage: the placement that describes it, the restore ``"auto"``
resolves to, the slots, streams and buffers of the plan, the kernel that can run the plan, the worker threads and
the prefetcher.

Example:
    >>> from torch import nn
    >>> from hf_smoothout import SmoothOutConfig
    >>> from hf_smoothout.selection import select_parameters
    >>> model, config = nn.Linear(4, 4), SmoothOutConfig(prefetch="never")
    >>> bound = Binding(model, select_parameters(model, config), config, rank=0, world_size=1, num_threads=1)
    >>> bound.placement.name, bound.restore_name, bound.kernel.name, len(bound.plan.slots)
    ('local', 'swap', 'inline', 2)
"""

from __future__ import annotations

import torch
from torch import nn

from . import guards
from .config import SmoothOutConfig
from .kernels import DrawContext, DrawKernel, select_kernel
from .kernels.prefetched import PrefetchedDraws, wants_prefetch
from .laws import get_noise_law
from .placement import Placement, detect_placement
from .plan import Plan, build_plan
from .restore import RestoreStrategy, resolve_restore, strategy_for
from .seeding import DrawKey
from .selection import SelectedParameter
from .threads import StreamRunner


class Binding:
    """The seams' choices for ``selected`` as the parameters are stored now, and the threads and buffers they use.

    Args:
        model: the module the parameters belong to (its other tensors decide whether ``"auto"`` may swap).
        selected: the parameters that receive noise.
        config: the method's settings.
        rank, world_size: this process and the number of processes.
        num_threads: worker threads for CPU noise streams.
        kernel_name: a kernel by name, or ``None`` for the automatic choice.
        placement: the placement already detected for this storage (detected here when ``None``).
    """

    def __init__(
        self,
        model: nn.Module,
        selected: list[SelectedParameter],
        config: SmoothOutConfig,
        *,
        rank: int,
        world_size: int,
        num_threads: int,
        kernel_name: str | None = None,
        placement: Placement | None = None,
    ) -> None:
        self.model, self.selected, self.config = model, selected, config
        self.law = get_noise_law(config.adapt)
        self.rank, self.world_size = rank, world_size
        self.num_threads, self.kernel_name = num_threads, kernel_name
        self.runner: StreamRunner[object] | None = None
        self.prefetch: PrefetchedDraws | None = None
        self.rebuild(placement)

    def rebuild(self, placement: Placement | None = None) -> None:
        """Bind to the parameters' current storage (the weights must be clean)."""
        config, enabled = self.config, self.config.enabled
        before = getattr(self, "placement", None)
        self.placement = placement or detect_placement(self.model, self.selected, self.rank, self.world_size)
        if before is not None and type(before) is not type(self.placement):  # e.g. DeepSpeed partitioned the model
            self.placement.check(config, self.selected)
        if enabled:
            self.placement.check_layout(self.model, self.selected)
        chosen = {id(sel.param) for sel in self.selected}
        others = [p for p in self.model.parameters() if id(p) not in chosen] + list(self.model.buffers())
        others += guards.module_tensor_attributes(self.model)
        sharded = self.placement.swap_blocker() is not None
        params = [s.param for s in self.selected]
        self.restore_name = resolve_restore(config, params, sharded=sharded, others=others)
        self.restore: RestoreStrategy = strategy_for(self.restore_name, denoise=config.denoise)
        self.plan: Plan = build_plan(
            self.selected,
            self.placement,
            second_buffer=self.restore.second_buffer,
            row_scaled=self.law.row_scaled,
            num_threads=self.num_threads,
            enabled=enabled,
        )
        self.kernel: DrawKernel = select_kernel(self.plan, self.restore, self.kernel_name)
        self.close()
        self.runner = StreamRunner(self.plan.workers)
        self.prefetch = None
        if enabled and wants_prefetch(self.plan, self.restore, config.prefetch):
            self.prefetch = PrefetchedDraws(self.plan)

    def rebind_if_moved(self) -> None:
        """Rebuild if a parameter's storage changed; refuse a parameter object that was replaced in the model."""
        guards.check_not_replaced(self.plan.slots)
        if guards.storage_changed(self.plan.slots, self.placement):
            self.rebuild()

    def context(self, key: DrawKey) -> DrawContext:
        """What a kernel reads to draw (or remove) the noise of ``key``."""
        assert self.runner is not None
        return DrawContext(self.plan, self.restore, self.law, key, self.placement, self.runner)

    def buffers(self) -> list[torch.Tensor]:
        """Every tensor allocated for the selected parameters: the plan's buffers and the prefetched draws."""
        return self.plan.buffers() + (self.prefetch.buffers if self.prefetch is not None else [])

    def close(self) -> None:
        """Stop the worker threads and the prefetcher (both restart on demand)."""
        if self.runner is not None:
            self.runner.close()
        if self.prefetch is not None:
            self.prefetch.close()
