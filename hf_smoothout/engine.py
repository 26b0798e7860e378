"""The SmoothOut engine: perturb a model's weights with scaled noise and remove it again.

Works on any ``nn.Module`` and imports nothing from the Trainer, so a plain PyTorch or
Accelerate loop can use it directly.

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import SmoothOutConfig
from .noise import fill_noise_, rebuild_noise_, row_norm_buffers
from .schedules import noise_coefficient
from .selection import SelectedParameter, select_parameters

# Scratch buffer of the regenerate/no-denoise path: at most this many elements per device and dtype,
# at least one whole row, and no more than ~1.5 % of the selected parameters.
_MAX_SCRATCH_ELEMENTS = 1 << 20
_MIN_SCRATCH_ELEMENTS = 1 << 14
_SCRATCH_FRACTION = 64


@dataclass
class _Slot:
    """One selected parameter with its preallocated buffers."""

    name: str
    param: nn.Parameter
    row_axis: int
    backup: torch.Tensor | None = None
    norms: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class _Group:
    """Parameters sharing a device and dtype: foreach ops run per group."""

    device: torch.device
    dtype: torch.dtype
    slots: list[_Slot] = field(default_factory=list)
    scratch: torch.Tensor | None = None

    @property
    def params(self) -> list[torch.Tensor]:
        return [s.param.data for s in self.slots]

    @property
    def backups(self) -> list[torch.Tensor]:
        return [s.backup for s in self.slots]  # type: ignore[misc]


def derive_seed(base_seed: int, rank: int, independent_ranks: bool) -> int:
    """The noise seed of ``rank``: the base seed, mixed with the rank when ranks draw independent noise.

    Example:
        >>> derive_seed(42, 0, True) != derive_seed(42, 1, True)
        True
        >>> derive_seed(42, 0, False) == derive_seed(42, 1, False)
        True
    """
    if not independent_ranks:
        rank = 0
    state = np.random.SeedSequence([int(base_seed), int(rank)]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def _distributed_rank_and_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class SmoothOut:
    """Stochastic SmoothOut / AdaSmoothOut on the parameters of ``model``.

    ``perturb`` draws fresh noise and adds it to the selected parameters; ``restore`` removes it
    (bit-exactly with ``restore="copy"``). ``perturbed`` wraps both around a block and always
    restores, also when the block raises. Buffers are allocated once, at construction (and again
    only if a parameter changes device, dtype or shape).

    Args:
        model: the module whose parameters are perturbed.
        config: the method's settings.
        rank: this process's rank (default: from ``torch.distributed`` when initialized, else 0).
        world_size: number of processes (same default).

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
    ) -> None:
        if not isinstance(config, SmoothOutConfig):
            raise TypeError(f"config must be a SmoothOutConfig, got {type(config).__name__}.")
        default_rank, default_world = _distributed_rank_and_size()
        self.rank = default_rank if rank is None else int(rank)
        self.world_size = default_world if world_size is None else int(world_size)
        if config.restore == "regenerate" and config.denoise and config.independent_ranks and self.world_size > 1:
            raise ValueError(
                "restore='regenerate' is refused when ranks draw different noise (independent_ranks=True with "
                f"world_size={self.world_size}): its rounding drift differs per rank and data-parallel replicas "
                "would diverge for good. Use restore='copy' (bit-exact), or independent_ranks=False."
            )
        self.model = model
        self.config = config
        self._selected: list[SelectedParameter] = select_parameters(model, config)
        base_seed = config.seed if config.seed is not None else torch.initial_seed() % (2**63)
        self.seed = derive_seed(base_seed, self.rank, config.independent_ranks)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._groups: list[_Group] = []
        self._layout: tuple[Any, ...] = ()
        self._perturbed = False
        self._current_strength = 0.0
        self._saved_generator_states: dict[torch.device, torch.Tensor] = {}
        self._chunks_done = 0
        self._noop = False
        self._allocate()

    # ------------------------------------------------------------------ introspection
    @property
    def parameter_names(self) -> list[str]:
        """Names of the parameters that receive noise."""
        return [s.name for s in self._selected]

    @property
    def parameters(self) -> list[nn.Parameter]:
        """The parameters that receive noise."""
        return [s.param for s in self._selected]

    @property
    def num_parameters(self) -> int:
        """Number of scalar weights that receive noise."""
        return sum(s.param.numel() for s in self._selected)

    @property
    def is_perturbed(self) -> bool:
        """True between ``perturb`` and ``restore``."""
        return self._perturbed

    @property
    def current_strength(self) -> float:
        """Effective strength (``strength * coef(t)``) of the last ``perturb``."""
        return self._current_strength

    @property
    def buffer_bytes(self) -> int:
        """Bytes held by this engine's buffers (backups, scratch, per-row vectors)."""
        total = 0
        for group in self._groups:
            if group.scratch is not None:
                total += group.scratch.numel() * group.scratch.element_size()
            for slot in group.slots:
                if slot.backup is not None:
                    total += slot.backup.numel() * slot.backup.element_size()
                for buf in slot.norms or ():
                    total += buf.numel() * buf.element_size()
        return total

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

    # ------------------------------------------------------------------ buffers
    def _current_layout(self) -> tuple[Any, ...]:
        return tuple((s.param.device, s.param.dtype, tuple(s.param.shape)) for s in self._selected)

    def _uses_backup(self) -> bool:
        return self.config.denoise and self.config.restore == "copy"

    def _allocate(self) -> None:
        """(Re)build groups and buffers for the parameters' current device, dtype and shape."""
        if self._perturbed:
            raise RuntimeError("Cannot reallocate SmoothOut buffers while the weights are perturbed.")
        self._layout = self._current_layout()
        groups: dict[tuple[torch.device, torch.dtype], _Group] = {}
        for sel in self._selected:
            p = sel.param
            key = (p.device, p.dtype)
            group = groups.setdefault(key, _Group(p.device, p.dtype))
            slot = _Slot(sel.name, p, sel.row_axis)
            if self.config.enabled and self._uses_backup():
                slot.backup = torch.empty_like(p.data, memory_format=torch.contiguous_format)
            if self.config.enabled and self.config.adapt == "filter":
                slot.norms = row_norm_buffers(p.data, sel.row_axis)
            group.slots.append(slot)
        if self.config.enabled and not self._uses_backup():
            for group in groups.values():
                total = sum(s.param.numel() for s in group.slots)
                largest_row = max(_row_block(s.param, s.row_axis) for s in group.slots)
                budget = max(_MIN_SCRATCH_ELEMENTS, min(_MAX_SCRATCH_ELEMENTS, total // _SCRATCH_FRACTION))
                group.scratch = torch.empty(max(budget, largest_row), device=group.device, dtype=group.dtype)
        self._groups = list(groups.values())
        for device in {g.device for g in self._groups}:
            if device not in self._generators:
                gen = torch.Generator(device=device)
                gen.manual_seed(self.seed)
                self._generators[device] = gen

    def _ensure_layout(self) -> None:
        if self._current_layout() != self._layout:
            self._allocate()

    # ------------------------------------------------------------------ perturb / restore
    def perturb(self, step: int = 0, total_steps: int | None = None) -> float:
        """Add fresh noise of strength ``strength_at(step, total_steps)`` to the selected weights.

        Returns the effective strength. Raises ``RuntimeError`` if the weights are already
        perturbed (call ``restore`` first). If drawing fails midway the weights are restored
        before the error propagates.
        """
        if self._perturbed:
            raise RuntimeError("SmoothOut.perturb called twice without restore(); the weights are already perturbed.")
        strength = self.strength_at(step, total_steps)
        self._current_strength = strength
        if strength == 0.0 or not self._selected:
            self._perturbed = True
            self._noop = True
            return strength
        self._noop = False
        self._ensure_layout()
        with torch.no_grad():
            if self._uses_backup():
                for group in self._groups:
                    torch._foreach_copy_(group.backups, group.params)
                self._perturbed = True
                try:
                    self._perturb_in_place(strength)
                except BaseException:
                    self.restore()
                    raise
            else:
                self._saved_generator_states = {d: g.get_state() for d, g in self._generators.items()}
                self._chunks_done = 0
                self._perturbed = True
                try:
                    self._perturb_from_scratch(strength)
                except BaseException:
                    self.restore()
                    raise
        return strength

    def _perturb_in_place(self, strength: float) -> None:
        """Copy mode: draw the noise straight into each parameter, then add the backed-up weights."""
        cfg = self.config
        for group in self._groups:
            gen = self._generators[group.device]
            for slot in group.slots:
                fill_noise_(
                    slot.param.data,
                    slot.backup,  # type: ignore[arg-type]
                    adapt=cfg.adapt,
                    distribution=cfg.distribution,
                    strength=strength,
                    row_axis=slot.row_axis,
                    generator=gen,
                    norm_buffers=slot.norms,
                )
            torch._foreach_add_(group.params, group.backups)

    def _perturb_from_scratch(self, strength: float) -> None:
        """Regenerate / no-denoise mode: draw noise chunk by chunk into a small scratch buffer."""
        cfg = self.config
        for group in self._groups:
            gen = self._generators[group.device]
            for slot, weight, noise, norms in _chunks(group):
                fill_noise_(
                    noise,
                    weight,
                    adapt=cfg.adapt,
                    distribution=cfg.distribution,
                    strength=strength,
                    row_axis=slot.row_axis,
                    generator=gen,
                    norm_buffers=norms,
                )
                weight.add_(noise)
                self._chunks_done += 1

    def restore(self) -> None:
        """Remove the noise added by the last ``perturb`` (no-op when not perturbed).

        With ``restore="copy"`` the weights are bit-identical to before ``perturb``. With
        ``"regenerate"`` the noise is redrawn from the saved generator state and subtracted (or
        divided out, for ``adapt="weight"``): equal up to rounding. With ``denoise=False`` the
        noise stays in the weights by design.
        """
        if not self._perturbed:
            return
        if not self._noop and self.config.denoise:
            with torch.no_grad():
                if self._uses_backup():
                    for group in self._groups:
                        torch._foreach_copy_(group.params, group.backups)
                else:
                    self._regenerate_and_remove()
        self._perturbed = False

    def _regenerate_and_remove(self) -> None:
        cfg = self.config
        for device, state in self._saved_generator_states.items():
            self._generators[device].set_state(state)
        remaining = self._chunks_done
        for group in self._groups:
            gen = self._generators[group.device]
            for _slot, weight, noise, norms in _chunks(group):
                if remaining == 0:
                    return
                rebuild_noise_(
                    noise,
                    adapt=cfg.adapt,
                    distribution=cfg.distribution,
                    strength=self._current_strength,
                    generator=gen,
                    row_scale=None if norms is None else norms[0],
                )
                if cfg.adapt == "weight":
                    weight.div_(noise)
                else:
                    weight.sub_(noise)
                remaining -= 1

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
        strength = self.perturb(step, total_steps)
        try:
            yield strength
        finally:
            self.restore()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Noise generator state, for bit-exact resume. Refused while perturbed."""
        if self._perturbed:
            raise RuntimeError("SmoothOut.state_dict() while the weights are perturbed; call restore() first.")
        return {
            "seed": self.seed,
            "generators": {str(device): gen.get_state() for device, gen in self._generators.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the noise generators saved by ``state_dict``."""
        if self._perturbed:
            raise RuntimeError("SmoothOut.load_state_dict() while the weights are perturbed; call restore() first.")
        saved = state.get("generators", {})
        for device, gen in self._generators.items():
            if str(device) in saved:
                gen.set_state(saved[str(device)].cpu())


def _row_block(param: torch.Tensor, row_axis: int) -> int:
    """Elements in one output row of ``param``."""
    return param.numel() // max(1, param.shape[row_axis]) if param.ndim > 1 else 1


def _chunks(
    group: _Group,
) -> Iterator[tuple[_Slot, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]]:
    """Split every parameter of ``group`` into whole-row chunks that fit the scratch buffer.

    Yields ``(slot, weight_chunk, scratch_view, norm_buffer_chunks)``; the order is fixed, so
    a regenerating pass sees the same chunks and the same random stream as the drawing pass.
    """
    scratch = group.scratch
    assert scratch is not None
    capacity = scratch.numel()
    for slot in group.slots:
        weight = slot.param.data
        axis = slot.row_axis if weight.ndim > 1 else 0
        rows = weight.shape[axis] if weight.ndim > 0 else 1
        per_row = _row_block(weight, axis) if weight.ndim > 0 else 1
        rows_per_chunk = max(1, capacity // per_row)
        if weight.ndim == 0:
            yield slot, weight, scratch[:1].view(()), slot.norms
            continue
        for start in range(0, rows, rows_per_chunk):
            length = min(rows_per_chunk, rows - start)
            weight_chunk = weight.narrow(axis, start, length)
            noise = scratch[: weight_chunk.numel()].view(weight_chunk.shape)
            norms = None
            if slot.norms is not None:
                norms = (slot.norms[0].narrow(axis, start, length), slot.norms[1].narrow(axis, start, length))
            yield slot, weight_chunk, noise, norms
