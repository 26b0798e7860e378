"""The noise window: the only place where noise enters and leaves the weights, and the noise sequence's position.

A `NoiseWindow` opens (`open`: draw and add), takes the noise out while staying open (`suspend`), puts the same
noise back (`resume`) and closes (`close`: remove it, bit-exactly with a second buffer). Every transition defers
Ctrl-C until the weights and the state agree, claims and releases the parameters (one engine per parameter), and
refuses writes made to a weight while it held noise. ``draws`` and ``base_seed`` are the noise state a checkpoint
keeps. `hf_smoothout.SmoothOut` is the public face of one window; this module holds the mechanics.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from hf_smoothout import SmoothOut, SmoothOutConfig
    >>> layer = nn.Linear(3, 3); clean = layer.weight.detach().clone()
    >>> window = SmoothOut(layer, SmoothOutConfig(strength=0.1, seed=0)).window
    >>> window.open(0.1, step=0)
    >>> window.is_noisy, torch.equal(layer.weight, clean)
    (True, False)
    >>> window.close(); window.draws, torch.equal(layer.weight, clean)
    (1, True)
"""

from __future__ import annotations

from typing import Any

import torch

from . import guards
from .binding import Binding
from .kernels import apply_law, seed_streams
from .lora_merged import MergedSpace
from .ownership import claim, release
from .seeding import DrawKey
from .threads import interrupts_deferred

# A finiteness check of the noisy weights runs at the first draw and whenever the effective strength exceeds this
# factor times the last checked one (a handful of checks per run, whatever the schedule).
FINITE_CHECK_GROWTH = 2.0


class NoiseWindow:
    """The open/suspended/closed state of one engine's noise and the transitions between them.

    Args:
        owner: the engine the parameters are claimed for (`hf_smoothout.ownership`).
        binding: the seams' choices for the parameters' current storage.
        merged: the LoRA merged space, if any.
        base_seed: the seed every draw derives from.
    """

    def __init__(self, owner: Any, binding: Binding, merged: MergedSpace | None, base_seed: int) -> None:
        self.owner, self.binding, self.merged = owner, binding, merged
        self.base_seed = base_seed
        self.draws = 0  # noise draws so far: with base_seed, the only state a checkpoint needs
        self.step_guarded = False  # a DeepSpeed engine's step restores first
        self.is_open = False  # open drew, close has not run
        self.suspended = False  # ... but the noise is out of the weights (suspend), until resume
        self.strength = 0.0  # effective strength of the last open
        self.span: tuple[int, int | None] = (0, None)  # (step, total_steps) the window was opened for
        self._held = False  # while suspended: the second buffers still hold this window's noisy weights
        self._noop = False
        self._window_versions: list[int] = []  # version counters of the weights once the noise was in
        self._suspend_versions: list[int] = []  # ... and once it was out again (suspend)
        self._checked_strength = 0.0  # largest strength whose noisy weights were checked to be finite

    @property
    def is_noisy(self) -> bool:
        """True while the weights hold noise: open and not suspended."""
        return self.is_open and not self.suspended

    def key(self, draw: int | None = None) -> DrawKey:
        """The key of draw ``draw`` (default: the current one) on this rank."""
        b = self.binding
        rank = b.placement.noise_rank(b.rank, b.config.independent_ranks)
        return DrawKey(self.base_seed, rank, self.draws if draw is None else draw, b.config.distribution)

    def claimed(self) -> list[tuple[str, torch.Tensor]]:
        """The parameters this window claims while open (the merged space's base weights too)."""
        claimed = [(slot.name, slot.param) for slot in self.binding.plan.slots]
        if self.merged is not None:
            claimed += [(f"{layer.name}.base_layer.weight", layer.weight) for layer in self.merged.layers]
        return claimed

    # ------------------------------------------------------------------ open
    def open(self, strength: float, step: int = 0, total_steps: int | None = None) -> None:
        """Draw fresh noise of ``strength`` and add it (restoring before any error propagates)."""
        if self.is_open:
            raise RuntimeError("SmoothOut.perturb called twice without restore(); the weights are already perturbed.")
        self.strength, self.span = strength, (step, total_steps)
        self.suspended = self._held = False
        self._window_versions = []  # set once the noise is in: a failed open checks no writes
        self._noop = strength == 0.0 or (not self.binding.selected and self.merged is None)
        if self._noop:
            self.is_open = True
            return
        with interrupts_deferred() as interrupt:  # Ctrl-C during open: restore, then raise it
            binding = self.binding
            binding.rebind_if_moved()
            binding.placement.check_before_perturb(binding.plan.slots, step_guarded=self.step_guarded)
            claim(self.claimed(), self.owner)
            try:
                self._draw_and_add(strength)
            except BaseException:
                if self.is_open:
                    self.close()
                else:
                    release((param for _, param in self.claimed()), self.owner)
                raise
            self._window_versions = guards.versions(binding.plan.slots, binding.placement)
            if interrupt.pending:
                self.close()

    def _draw_and_add(self, strength: float) -> None:
        binding = self.binding
        plan, restore, prefetch = binding.plan, binding.restore, binding.prefetch
        with torch.no_grad():
            check_finite = strength > FINITE_CHECK_GROWTH * self._checked_strength
            clean_finite = check_finite and guards.all_finite([s.data for s in plan.slots], binding.placement)
            restore.before_draw(plan)
            ctx = binding.context(self.key())
            seed_streams(plan, ctx.key)
            self.is_open = True
            prefetched = prefetch.take(ctx.key) if prefetch is not None else None
            if prefetched is not None:
                apply_law(ctx, strength, prefetched)
            else:
                binding.kernel.draw_and_apply(ctx, strength)
            restore.after_apply(plan)  # swap: the forward and backward pass now read the noisy buffers
            binding.placement.release_copies(plan.slots)  # ZeRO-3: the next forward gathers the noisy slices
            if prefetch is not None:  # the next draw, on the background thread, during this forward
                prefetch.start(self.key(self.draws + 1))
            self._arm_merged(strength, check_finite=check_finite)
            if clean_finite:
                noisy = [restore.noisy(slot) for slot in plan.slots]
                if not guards.all_finite(noisy, binding.placement):
                    bad = (s.name for s, t in zip(plan.slots, noisy, strict=True) if not bool(t.isfinite().all()))
                    raise guards.non_finite_noise_error(strength, binding.config.adapt, next(bad, "?"))
                self._checked_strength = strength

    def _arm_merged(self, strength: float, *, check_finite: bool) -> None:
        if self.merged is not None:
            # The merged space writes no shard: its ranks follow independent_ranks whatever the placement (FSDP2 too)
            config = self.binding.config
            rank = self.binding.rank if config.independent_ranks else 0
            key = DrawKey(self.base_seed, rank, self.draws, config.distribution)
            self.merged.arm(key, adapt=config.adapt, strength=strength, check_finite=check_finite)

    # ------------------------------------------------------------------ close, suspend, resume
    def close(self) -> None:
        """Take the noise out (unless suspended) and close; raises (weights clean) on a write inside the window."""
        if not self.is_open:
            return
        error: RuntimeError | None = None
        with interrupts_deferred():  # Ctrl-C waits until the weights are clean and the state says so
            try:
                if not self.suspended:
                    error = self._take_noise_out(keep=False)
            finally:
                self._settle_closed()
        if error is not None:
            raise error

    def suspend(self) -> None:
        """Take the noise out bit-exactly but stay open, keeping the noisy weights where the restore can."""
        if not self.is_noisy:
            return
        error: RuntimeError | None = None
        with interrupts_deferred():
            try:
                error = self._take_noise_out(keep=True)
            except BaseException:
                # keep=True fails before touching a weight (allocating the held buffers): remove the noise plainly
                try:
                    if self.binding.restore.second_buffer:
                        self._take_noise_out(keep=False)
                finally:
                    self._settle_closed()
                raise
            if error is not None:
                self._settle_closed()
            else:
                self.suspended = True
                self._suspend_versions = guards.versions(self.binding.plan.slots, self.binding.placement)
        if error is not None:
            raise error

    def resume(self) -> None:
        """Put the window's own noise back: from the kept buffers if the clean weights are untouched, else redrawn."""
        if not self.is_open or not self.suspended:
            return
        binding = self.binding
        if self._noop or not binding.restore.removes_noise:
            self.suspended = False
            return
        if not (self._held and guards.untouched_since(binding.plan.slots, binding.placement, self._suspend_versions)):
            # Draw the same noise again: same draw index, current clean weights.
            release((param for _, param in self.claimed()), self.owner)
            self.is_open = self.suspended = self._held = False
            try:
                self.open(self.strength, *self.span)
            except BaseException:
                if not self.is_open:
                    self.draws += 1  # the window is gone: its draw counts, as a close would count it
                raise
            return
        with interrupts_deferred() as interrupt:
            self._arm_merged(self.strength, check_finite=False)  # may refuse: before any weight is written
            with torch.no_grad():
                binding.restore.put_back(binding.plan)
                binding.placement.release_copies(binding.plan.slots)
            self.suspended = False
            self._window_versions = guards.versions(binding.plan.slots, binding.placement)
            if interrupt.pending:
                self.close()

    def _settle_closed(self) -> None:
        self.is_open = self.suspended = self._held = False
        self._window_versions = []
        if not self._noop:
            release((param for _, param in self.claimed()), self.owner)
        self.draws += 1

    def _take_noise_out(self, *, keep: bool) -> RuntimeError | None:
        """Make the weights clean again (bit-exactly with a second buffer); ``keep``: leave the noisy weights in the
        second buffers for `resume`. Returns the error to raise once the window's state is settled, or ``None``."""
        if self.merged is not None:
            self.merged.disarm()  # nothing to undo: merged-space noise never touches a weight
        binding = self.binding
        if self._noop or not binding.restore.removes_noise:
            return None
        plan, placement, restore = binding.plan, binding.placement, binding.restore
        moved = guards.moved_slots(plan.slots, placement, restore.expected)
        written = guards.written_slot(plan.slots, placement, self._window_versions, moved)
        unrecoverable: str | None = None
        with torch.no_grad():
            ctx = binding.context(self.key())
            self._held = restore.take_out(
                plan, moved, keep=keep, redraw=lambda: binding.kernel.remove(ctx, self.strength)
            )
            # A wrapper that moved a weight to new storage while perturbed, copying it (FSDP2 re-pads a shard
            # at its first forward): the copy holds exactly the noisy values, so the clean ones go there too.
            for slot, live, recoverable in moved.values():
                if recoverable:
                    live.copy_(slot.data)
                elif unrecoverable is None:
                    unrecoverable = slot.name
            placement.release_copies(plan.slots)  # ZeRO-3: no gathered noisy copy outlives the window
        if unrecoverable is not None:
            return guards.moved_storage_error(unrecoverable)
        if written is not None:
            return guards.written_in_window_error(written)
        return None
