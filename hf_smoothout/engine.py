"""The SmoothOut engine: perturb a model's weights with scaled noise and remove it again.

Works on any ``nn.Module`` and imports nothing from the Trainer, so a plain PyTorch or Accelerate loop can use it
directly. The engine owns the **noise window** (`SmoothOut.perturb` to `SmoothOut.restore`, with `suspend` /
`resume` in between) and asks its seams for everything else:

- the law (`hf_smoothout.laws`): how a raw draw becomes noise;
- the draw key and stream ranges (`hf_smoothout.seeding`): the noise is a function of ``(seed, rank, stream,
  draw)`` alone, not of the thread count, so a restore can regenerate it and a checkpoint needs the draw index only;
- the placement (`hf_smoothout.placement`): plain tensors, FSDP2 shards or DeepSpeed's flat groups;
- the plan (`hf_smoothout.plan`): slots, streams and buffers grouped by device and dtype;
- the restore strategy (`hf_smoothout.restore`): copy, swap or regenerate, and ``"auto"``'s choice;
- the kernel (`hf_smoothout.kernels`): inline CPU, worker threads, chunked in place (plus prefetched draws);
- the guards (`hf_smoothout.guards`, `hf_smoothout.ownership`): re-binding, replaced parameters, writes inside
  the window, finiteness, one engine per parameter.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from hf_smoothout import SmoothOut, SmoothOutConfig
    >>> model = nn.Linear(8, 2)
    >>> smoothout = SmoothOut(model, SmoothOutConfig(strength=0.05, seed=0))
    >>> before = model.weight.detach().clone()
    >>> with smoothout.perturbed(step=0):
    ...     loss = model(torch.randn(4, 8)).pow(2).mean()
    ...     loss.backward()          # gradient at the perturbed point
    >>> torch.equal(model.weight, before)   # de-noised bit-exactly
    True
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from . import guards
from .adapters.deepspeed import restore_before_step
from .config import SmoothOutConfig
from .kernels import DrawContext, apply_law, seed_streams, select_kernel
from .kernels.prefetched import PrefetchedDraws, wants_prefetch
from .laws import get_noise_law
from .lora_merged import MergedSpace, build_merged_space
from .noise import NonFiniteNoiseError
from .ownership import claim, release
from .placement import detect_placement
from .plan import Plan, build_plan, streams_for
from .restore import EXACT_RESTORES, resolve_restore, strategy_for
from .schedules import noise_coefficient
from .seeding import DrawKey
from .selection import SelectedParameter, select_parameters
from .threads import StreamRunner, interrupts_deferred

__all__ = ["NonFiniteNoiseError", "SmoothOut", "streams_for"]

# A finiteness check of the noisy weights runs at the first perturb and whenever the effective strength
# exceeds this factor times the last checked one (a handful of checks per run, whatever the schedule).
_FINITE_CHECK_GROWTH = 2.0


def _distributed_rank_and_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class SmoothOut:
    """Stochastic SmoothOut / AdaSmoothOut on the parameters of ``model``.

    ``perturb`` draws fresh noise and adds it to the selected parameters; ``restore`` removes it
    (bit-exactly with the default ``restore="auto"``, and with ``"copy"`` or ``"swap"``). ``perturbed`` wraps
    both around a block and always restores, also when the block raises. Buffers are allocated once, at
    construction (and again only if a parameter changes device, dtype or shape).

    Args:
        model: the module whose parameters are perturbed.
        config: the method's settings.
        rank: this process's rank (default: from ``torch.distributed`` when initialized, else 0).
        world_size: number of processes (same default).
        num_threads: worker threads drawing CPU noise streams in parallel (default:
            ``torch.get_num_threads()``); does not change the noise, only the speed.
        kernel: the draw-and-apply kernel by name (`hf_smoothout.kernels.KERNELS`); default: ``config.kernel``
            (``"auto"``: the engine's choice, which never changes the numbers).

    Example:
        >>> from torch import nn
        >>> so = SmoothOut(nn.Linear(4, 4), SmoothOutConfig(strength=0.01, seed=1))
        >>> so.perturb(step=0); so.is_perturbed
        0.01
        True
        >>> so.restore(); so.is_perturbed
        False
    """

    def __init__(
        self,
        model: nn.Module,
        config: SmoothOutConfig,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        num_threads: int | None = None,
        kernel: str | None = None,
    ) -> None:
        if not isinstance(config, SmoothOutConfig):
            raise TypeError(f"config must be a SmoothOutConfig, got {type(config).__name__}.")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}.")
        default_rank, default_world = _distributed_rank_and_size()
        self.rank = default_rank if rank is None else int(rank)
        self.world_size = default_world if world_size is None else int(world_size)
        guards.check_restore_mode(config, self.world_size)
        self.model = model
        self.config = config
        self._law = get_noise_law(config.adapt)
        self._selected: list[SelectedParameter] = select_parameters(model, config)
        self._merged: MergedSpace | None = None
        if config.space == "lora_merged":
            self._merged, self._selected = build_merged_space(model, config, self._selected)
        if config.enabled and config.denoise:
            guards.check_no_forward_writes(self._selected)
        self._placement = detect_placement(model, self._selected, self.rank, self.world_size)
        self._placement.check(config, self._selected)
        self.base_seed = config.seed if config.seed is not None else torch.initial_seed() % (2**63)
        self.num_threads = num_threads if num_threads is not None else max(1, torch.get_num_threads())
        self._kernel_name = kernel if kernel is not None else (None if config.kernel == "auto" else config.kernel)
        self._runner: StreamRunner[Any] | None = None
        self._prefetch: PrefetchedDraws | None = None
        self._draws = 0  # noise draws so far: the only state a checkpoint needs
        self._perturbed = False  # the noise window is open: perturb ran, restore has not
        self._suspended = False  # ... but the noise is out of the weights (suspend), until resume
        self._held = False  # while suspended: the second buffers still hold this window's noisy weights
        self._window: tuple[int, int | None] = (0, None)  # (step, total_steps) the window was opened for
        self._window_versions: list[int] = []  # version counters of the weights once the noise was in
        self._suspend_versions: list[int] = []  # ... and once it was out again (suspend)
        self._noop = False
        self._current_strength = 0.0
        self._checked_strength = 0.0  # largest strength whose noisy weights were checked to be finite
        self._allocate()
        self._step_guarded = False  # a DeepSpeed engine's step restores first (guard_deepspeed_step)
        self._placement.attach(self)
        guards.warn_if_implausible_strength(config, self.parameters)

    # ------------------------------------------------------------------ introspection
    @property
    def parameter_names(self) -> list[str]:
        """Names of the parameters that receive noise in place (``space="lora_merged"``: not the LoRA layers)."""
        return [s.name for s in self._selected]

    @property
    def merged_layer_names(self) -> list[str]:
        """Names of the LoRA layers whose merged weight receives noise (``space="lora_merged"``), else empty."""
        return [layer.name for layer in self._merged.layers] if self._merged is not None else []

    @property
    def merged_space(self) -> MergedSpace | None:
        """The LoRA merged-space noise (``space="lora_merged"`` and strength > 0), else ``None``."""
        return self._merged

    @property
    def parameters(self) -> list[nn.Parameter]:
        """The parameters that receive noise (with ``space="lora_merged"``, the LoRA layers' base weights too)."""
        merged = [layer.weight for layer in self._merged.layers] if self._merged is not None else []
        return [s.param for s in self._selected] + merged

    @property
    def num_parameters(self) -> int:
        """Number of scalar weights that receive noise."""
        merged = self._merged.num_parameters if self._merged is not None else 0
        return sum(s.param.numel() for s in self._selected) + merged

    @property
    def is_perturbed(self) -> bool:
        """True between ``perturb`` and ``restore``: the noise window is open (also while suspended)."""
        return self._perturbed

    @property
    def is_noisy(self) -> bool:
        """True while the weights hold noise: between ``perturb`` (or ``resume``) and ``restore`` (or ``suspend``).

        Example:
            >>> from torch import nn
            >>> so = SmoothOut(nn.Linear(2, 2), SmoothOutConfig(strength=0.1, seed=0))
            >>> _ = so.perturb(); so.suspend(); so.is_perturbed, so.is_noisy
            (True, False)
            >>> so.resume(); so.is_noisy
            True
            >>> so.restore(); so.is_perturbed
            False
        """
        return self._perturbed and not self._suspended

    @property
    def window_step(self) -> int | None:
        """The ``step`` the open noise window was drawn for (``perturb(step, ...)``), else ``None``."""
        return self._window[0] if self._perturbed else None

    @property
    def current_strength(self) -> float:
        """Effective strength (``strength * coef(t)``) of the last ``perturb``."""
        return self._current_strength

    @property
    def buffer_bytes(self) -> int:
        """Bytes held by this engine's buffers (backups, scratch, per-row vectors, merged-space scratch)."""
        merged = self._merged.buffer_bytes if self._merged is not None else 0
        return sum(t.numel() * t.element_size() for t in self.buffers()) + merged

    def buffers(self) -> list[torch.Tensor]:
        """Every tensor this engine allocated for the selected parameters (plan buffers and prefetched draws)."""
        return self._plan.buffers() + (self._prefetch.buffers if self._prefetch is not None else [])

    @property
    def restore_mode(self) -> str:
        """The restore this engine runs: ``config.restore``, with ``"auto"`` resolved to ``"swap"`` or ``"copy"``
        (`hf_smoothout.restore.auto`; decided again whenever the parameters' storage changes).

        Example:
            >>> from torch import nn
            >>> SmoothOut(nn.Linear(2, 2), SmoothOutConfig()).restore_mode
            'swap'
        """
        return self._restore_name

    def describe(self) -> dict[str, Any]:
        """How this engine runs, as its seams chose: placement, restore, kernel, streams, worker threads, prefetch.

        Example:
            >>> from torch import nn
            >>> info = SmoothOut(nn.Linear(2, 2), SmoothOutConfig(prefetch="never")).describe()
            >>> info["placement"], info["restore"], info["kernel"], info["streams"], info["workers"], info["prefetch"]
            ('local', 'swap', 'inline', 1, 1, False)
        """
        return {
            "placement": self._placement.name,
            "restore": self._restore_name,
            "kernel": self._kernel.name,
            "law": self._law.name,
            "streams": len(self._plan.streams),
            "workers": self._plan.workers,
            "prefetch": self._prefetch is not None,
            "parameters": len(self._plan.slots),
            "merged_layers": len(self.merged_layer_names),
            "buffer_bytes": self.buffer_bytes,
        }

    def strength_at(self, step: int, total_steps: int | None = None) -> float:
        """Effective noise strength ``a * coef(step)``.

        Example:
            >>> from torch import nn
            >>> so = SmoothOut(nn.Linear(2, 2), SmoothOutConfig(strength=0.1, schedule="tanh"))
            >>> so.strength_at(50, total_steps=100)
            0.05
        """
        if not self.config.enabled:
            return 0.0
        cfg = self.config
        return cfg.strength * noise_coefficient(
            cfg.schedule, step, total_steps, anneal_index=cfg.anneal_index, tanh_scale=cfg.tanh_scale
        )

    # ------------------------------------------------------------------ layout
    def _allocate(self) -> None:
        """(Re)build the plan, restore strategy, kernel and prefetcher for the parameters' current storage."""
        if self._perturbed:
            raise RuntimeError("Cannot reallocate SmoothOut buffers while the weights are perturbed.")
        config, enabled = self.config, self.config.enabled
        self._placement = detect_placement(self.model, self._selected, self.rank, self.world_size)
        if enabled:
            self._placement.check_layout(self.model, self._selected)
        chosen = {id(sel.param) for sel in self._selected}
        others = [p for p in self.model.parameters() if id(p) not in chosen] + list(self.model.buffers())
        others += guards.module_tensor_attributes(self.model)
        sharded = self._placement.swap_blocker() is not None
        self._restore_name = resolve_restore(config, [s.param for s in self._selected], sharded=sharded, others=others)
        self._restore = strategy_for(self._restore_name, denoise=config.denoise)
        self._plan: Plan = build_plan(
            self._selected,
            self._placement,
            second_buffer=self._restore.second_buffer,
            row_scaled=self._law.row_scaled,
            num_threads=self.num_threads,
            enabled=enabled,
        )
        self._kernel = select_kernel(self._plan, self._restore, self._kernel_name)
        if self._runner is not None:
            self._runner.close()
        self._runner = StreamRunner(self._plan.workers)
        if self._prefetch is not None:
            self._prefetch.close()
        self._prefetch = None
        if enabled and wants_prefetch(self._plan, self._restore, config.prefetch):
            self._prefetch = PrefetchedDraws(self._plan)

    def _key(self, draw: int | None = None) -> DrawKey:
        rank = self._placement.noise_rank(self.rank, self.config.independent_ranks)
        return DrawKey(self.base_seed, rank, self._draws if draw is None else draw, self.config.distribution)

    def _context(self) -> DrawContext:
        assert self._runner is not None
        return DrawContext(self._plan, self._restore, self._law, self._key(), self._placement, self._runner)

    def guard_deepspeed_step(self, deepspeed_engine: Any) -> None:
        """Make ``deepspeed_engine.step()`` restore the clean weights first.

        Under DeepSpeed, accelerate's ``accelerator.backward(loss)`` (and ``engine.backward`` + ``engine.step`` in a
        plain DeepSpeed loop) runs the optimizer step inside the window; restoring after it would write the
        pre-step weights back. Built on the DeepSpeed engine itself (what ``accelerator.prepare`` returned), the
        engine installs this guard on its own; `SmoothOutTrainer` installs it too.
        """
        restore_before_step(deepspeed_engine, self.restore)
        self._step_guarded = True

    @property
    def parameters_replaced(self) -> bool:
        """Whether a selected parameter object was replaced in the model since this engine was built.

        Wrappers that re-register parameters (accelerate's FSDP2 ``fully_shard`` makes every weight a new
        DTensor ``Parameter``) leave the engine bound to objects the forward pass no longer uses; build a new
        engine then (`SmoothOutTrainer` does, carrying the noise position over).

        Example:
            >>> from torch import nn
            >>> layer = nn.Linear(2, 2)
            >>> so = SmoothOut(layer, SmoothOutConfig(strength=0.1))
            >>> layer.weight = nn.Parameter(layer.weight.detach().clone())
            >>> so.parameters_replaced
            True
        """
        return guards.replaced_slot(self._plan.slots) is not None

    # ------------------------------------------------------------------ the noise window
    def perturb(self, step: int = 0, total_steps: int | None = None) -> float:
        """Open the noise window: add fresh noise of strength ``strength_at(step, total_steps)`` to the weights.

        Returns the effective strength. Raises ``RuntimeError`` if the weights are already
        perturbed (call ``restore`` first). If drawing fails midway the weights are restored
        before the error propagates.
        """
        if self._perturbed:
            raise RuntimeError("SmoothOut.perturb called twice without restore(); the weights are already perturbed.")
        strength = self.strength_at(step, total_steps)
        self._current_strength = strength
        self._window = (step, total_steps)
        self._suspended = self._held = False
        self._window_versions = []  # set once the noise is in: a failed perturb checks no writes
        self._noop = strength == 0.0 or (not self._selected and self._merged is None)
        if self._noop:
            self._perturbed = True
            return strength
        with interrupts_deferred() as interrupt:  # Ctrl-C during perturb: restore, then raise it
            self._check_bindings()
            self._placement.check_before_perturb(self._plan.slots, step_guarded=self._step_guarded)
            claim(self._claimed_parameters(), self)
            try:
                self._perturb_claimed(strength)
            except BaseException:
                if self._perturbed:
                    self.restore()
                else:
                    release((param for _, param in self._claimed_parameters()), self)
                raise
            self._window_versions = guards.versions(self._plan.slots, self._placement)
            if interrupt.pending:
                self.restore()
        return strength

    def _check_bindings(self) -> None:
        """Re-bind the buffers if a parameter's storage changed; refuse a parameter object that was replaced."""
        guards.check_not_replaced(self._plan.slots)
        if guards.storage_changed(self._plan.slots, self._placement):
            self._allocate()

    def _claimed_parameters(self) -> list[tuple[str, torch.Tensor]]:
        claimed = [(slot.name, slot.param) for slot in self._plan.slots]
        if self._merged is not None:
            claimed += [(f"{layer.name}.base_layer.weight", layer.weight) for layer in self._merged.layers]
        return claimed

    def _perturb_claimed(self, strength: float) -> None:
        plan, restore = self._plan, self._restore
        with torch.no_grad():
            check_finite = strength > _FINITE_CHECK_GROWTH * self._checked_strength
            clean_finite = check_finite and guards.all_finite([s.data for s in plan.slots], self._placement)
            restore.before_draw(plan)
            ctx = self._context()
            seed_streams(plan, ctx.key)
            self._perturbed = True
            prefetched = self._prefetch.take(ctx.key) if self._prefetch is not None else None
            if prefetched is not None:
                apply_law(ctx, strength, prefetched)
            else:
                self._kernel.draw_and_apply(ctx, strength)
            restore.after_apply(plan)  # swap: the forward and backward pass now read the noisy buffers
            if self._prefetch is not None:  # the next draw, on the background thread, during this forward
                self._prefetch.start(self._key(self._draws + 1))
            self._arm_merged(strength, check_finite=check_finite)
            if clean_finite:
                noisy = [restore.noisy(slot) for slot in plan.slots]
                if not guards.all_finite(noisy, self._placement):
                    bad = (s.name for s, t in zip(plan.slots, noisy, strict=True) if not bool(t.isfinite().all()))
                    first = next(bad, "?")
                    raise guards.non_finite_noise_error(strength, self.config.adapt, first)
                self._checked_strength = strength

    def _arm_merged(self, strength: float, *, check_finite: bool) -> None:
        if self._merged is not None:
            key = self._key()
            self._merged.arm(
                adapt=self.config.adapt,
                distribution=key.distribution,
                strength=strength,
                base_seed=key.base_seed,
                rank=key.rank,
                draw=key.draw,
                check_finite=check_finite,
            )

    def restore(self) -> None:
        """Remove the noise added by the last ``perturb`` and close the noise window (no-op when not perturbed).

        With ``restore="copy"``, ``"swap"`` or ``"auto"`` the weights are bit-identical to before ``perturb``. With
        ``"regenerate"`` the noise is redrawn from the same seeds and removed: equal up to rounding. With
        ``denoise=False`` the noise stays in the weights by design.

        Raises ``RuntimeError`` (after restoring) when a weight was written inside the window (see `suspend`).
        """
        if not self._perturbed:
            return
        error: RuntimeError | None = None
        with interrupts_deferred():  # Ctrl-C waits until the weights are clean and the state says so
            try:
                if not self._suspended:
                    error = self._take_noise_out(keep=False)
            finally:
                self._close_window()
        if error is not None:
            raise error

    def suspend(self) -> None:
        """Take the noise out of the weights, bit-exactly as `restore` does, but keep the window open: `resume`
        puts the same noisy weights back (no new draw). No-op unless the weights are noisy.

        Between the micro-batches of one ``noise_every="step"`` window the weights are clean this way, so nothing
        that runs there (evaluation, checkpoints, callbacks, generation) sees noise. With swap the noisy weights
        stay in the swap buffers (free); with copy they are kept in one more buffer per weight (allocated at the
        first suspend); with regenerate (or after a wrapper moved a weight) the noise is removed and drawn again,
        identically, by `resume`.

        Raises ``RuntimeError`` (after closing the window, weights clean) when a weight was written between
        ``perturb`` and now (an optimizer step inside backward, ``nn.Embedding(max_norm=...)``): removing the noise
        would silently undo that write.
        """
        if not self.is_noisy:
            return
        error: RuntimeError | None = None
        with interrupts_deferred():
            try:
                error = self._take_noise_out(keep=True)
            except BaseException:
                # keep=True fails before touching a weight (allocating the held buffers): remove the noise plainly
                try:
                    if self._restore.second_buffer:
                        self._take_noise_out(keep=False)
                finally:
                    self._close_window()
                raise
            if error is not None:
                self._close_window()
            else:
                self._suspended = True
                self._suspend_versions = guards.versions(self._plan.slots, self._placement)
        if error is not None:
            raise error

    def resume(self) -> None:
        """Put the open window's noise back into the weights after `suspend` (no-op unless suspended).

        The noisy weights are exactly those of the window's ``perturb``: taken from the kept buffers when the clean
        weights are untouched since `suspend` (their version counters and storage unchanged), else drawn again
        from the same draw (the noise is a function of seed, rank, stream and draw, and of the clean weights for
        the per-row laws).
        """
        if not self._perturbed or not self._suspended:
            return
        if self._noop or not self._restore.removes_noise:
            self._suspended = False
            return
        if not (self._held and guards.untouched_since(self._plan.slots, self._placement, self._suspend_versions)):
            # Draw the same noise again: same draw index, current clean weights.
            release((param for _, param in self._claimed_parameters()), self)
            self._perturbed = self._suspended = self._held = False
            try:
                self.perturb(*self._window)
            except BaseException:
                if not self._perturbed:
                    self._draws += 1  # the window is gone: its draw counts, as a restore would count it
                raise
            return
        with interrupts_deferred() as interrupt:
            self._arm_merged(self._current_strength, check_finite=False)  # may refuse: before any weight is written
            with torch.no_grad():
                self._restore.put_back(self._plan)
            self._suspended = False
            self._window_versions = guards.versions(self._plan.slots, self._placement)
            if interrupt.pending:
                self.restore()

    @contextlib.contextmanager
    def noise_suspended(self) -> Iterator[None]:
        """Context manager: clean weights inside (`suspend`), the window's noise back on exit (`resume`).

        For code that must run at the clean weights while a window is open (an evaluation or a reference pass
        inside a training step). A no-op when the weights are not noisy.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> layer = nn.Linear(3, 3); clean = layer.weight.detach().clone()
            >>> so = SmoothOut(layer, SmoothOutConfig(strength=0.1, seed=0))
            >>> with so.perturbed():
            ...     with so.noise_suspended():
            ...         torch.equal(layer.weight, clean)
            True
        """
        was_noisy = self.is_noisy
        self.suspend()
        try:
            yield
        finally:
            if was_noisy:
                self.resume()

    def _close_window(self) -> None:
        self._perturbed = self._suspended = self._held = False
        self._window_versions = []
        if not self._noop:
            release((param for _, param in self._claimed_parameters()), self)
        self._draws += 1

    def _take_noise_out(self, *, keep: bool) -> RuntimeError | None:
        """Make the weights clean again (bit-exactly with a second buffer); ``keep``: leave the noisy weights in the
        second buffers for `resume`. Returns the error to raise once the window's state is settled, or ``None``."""
        if self._merged is not None:
            self._merged.disarm()  # nothing to undo: merged-space noise never touches a weight
        if self._noop or not self._restore.removes_noise:
            return None
        plan, placement, restore = self._plan, self._placement, self._restore
        moved = guards.moved_slots(plan.slots, placement, restore.expected)
        written = guards.written_slot(plan.slots, placement, self._window_versions, moved)
        unrecoverable: str | None = None
        with torch.no_grad():
            ctx = self._context()
            self._held = restore.take_out(
                plan, moved, keep=keep, redraw=lambda: self._kernel.remove(ctx, self._current_strength)
            )
            # A wrapper that moved a weight to new storage while perturbed, copying it (FSDP2 re-pads a shard
            # at its first forward): the copy holds exactly the noisy values, so the clean ones go there too.
            for slot, live, recoverable in moved.values():
                if recoverable:
                    live.copy_(slot.data)
                elif unrecoverable is None:
                    unrecoverable = slot.name
        if unrecoverable is not None:
            return guards.moved_storage_error(unrecoverable)
        if written is not None:
            return guards.written_in_window_error(written)
        return None

    @contextlib.contextmanager
    def perturbed(self, step: int = 0, total_steps: int | None = None) -> Iterator[float]:
        """Context manager: perturb on entry, always restore on exit; yields the effective strength.

        Example:
            >>> from torch import nn
            >>> so = SmoothOut(nn.Linear(3, 3), SmoothOutConfig(strength=0.02, seed=0))
            >>> with so.perturbed(step=10) as a:
            ...     a
            0.02
        """
        try:  # perturb inside the try: an interrupt right after it returns still restores
            strength = self.perturb(step, total_steps)
            yield strength
        finally:
            self.restore()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The noise position (seed and draw count) and the settings that drew it. Refused while perturbed.

        ``base_seed`` and ``draws`` are all a bit-exact resume needs; ``config``, ``rank`` and
        ``world_size`` let `load_state_dict` say what changed since the state was saved.

        Example:
            >>> from torch import nn
            >>> so = SmoothOut(nn.Linear(2, 2), SmoothOutConfig(seed=3))
            >>> with so.perturbed():
            ...     pass
            >>> {k: so.state_dict()[k] for k in ("base_seed", "draws", "rank", "world_size")}
            {'base_seed': 3, 'draws': 1, 'rank': 0, 'world_size': 1}
        """
        if self.is_noisy:
            raise RuntimeError("SmoothOut.state_dict() while the weights are perturbed; call restore() first.")
        return {
            "base_seed": self.base_seed,
            "draws": self._draws + int(self._perturbed),  # a suspended window counts as drawn: restore() closes it
            "config": self.config.to_dict(),
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> list[str]:
        """Continue the noise sequence saved by ``state_dict`` (seed and draw count).

        Warns when the saved settings differ from this engine's (the resumed run then differs from an
        uninterrupted one) and returns those differences as ``"field: saved -> current"`` lines. The
        saved seed always wins over ``config.seed``: that is what continues the noise sequence.

        Raises:
            ValueError: if ``state`` is not a SmoothOut state, or holds out-of-range values.

        Example:
            >>> from torch import nn
            >>> so = SmoothOut(nn.Linear(2, 2), SmoothOutConfig(seed=3))
            >>> so.load_state_dict({"base_seed": 3, "draws": 7}); so.state_dict()["draws"]
            []
            7
        """
        if self._perturbed:
            raise RuntimeError("SmoothOut.load_state_dict() while the weights are perturbed; call restore() first.")
        guards.validate_state(state)
        differences = guards.state_differences(state, self.config, EXACT_RESTORES)
        if differences:
            warnings.warn(
                "SmoothOut: resuming a noise state saved with other settings ("
                + "; ".join(differences)
                + "). The run continues with the current settings and will differ from an uninterrupted run.",
                UserWarning,
                stacklevel=2,
            )
        self.base_seed, self._draws = state["base_seed"], state["draws"]
        return differences

    def close(self) -> None:
        """Stop the worker threads (the engine still works afterwards; threads restart on demand)."""
        if self._runner is not None:
            self._runner.close()
        if self._prefetch is not None:
            self._prefetch.close()

    def detach(self) -> None:
        """Remove the merged-space forward wrappers from the model's LoRA layers (``space="lora_merged"``).

        The layers compute exactly as before the engine was built; this engine cannot perturb them again.
        """
        if self.is_noisy:
            raise RuntimeError("SmoothOut.detach() while the weights are perturbed; call restore() first.")
        self.restore()  # a suspended window: the weights are clean already
        if self._merged is not None:
            self._merged.close()
