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

`hf_smoothout.binding` holds what the seams chose for the weights' current storage, `hf_smoothout.window` the
transitions of the window (open, suspend, resume, close); this class is their public face.

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
from .binding import Binding
from .config import SmoothOutConfig
from .lora_merged import MergedSpace, build_merged_space
from .noise import NonFiniteNoiseError
from .placement import detect_placement
from .plan import streams_for
from .restore import EXACT_RESTORES
from .schedules import noise_coefficient
from .selection import SelectedParameter, select_parameters
from .window import NoiseWindow

__all__ = ["NonFiniteNoiseError", "SmoothOut", "streams_for"]


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
        self.model, self.config = model, config
        self._selected: list[SelectedParameter] = select_parameters(model, config)
        self._merged: MergedSpace | None = None
        if config.space == "lora_merged":
            self._merged, self._selected = build_merged_space(model, config, self._selected)
        if config.enabled and config.denoise:
            guards.check_no_forward_writes(self._selected)
        placement = detect_placement(model, self._selected, self.rank, self.world_size)
        placement.check(config, self._selected)
        self.num_threads = num_threads if num_threads is not None else max(1, torch.get_num_threads())
        self._binding = Binding(
            model,
            self._selected,
            config,
            rank=self.rank,
            world_size=self.world_size,
            num_threads=self.num_threads,
            kernel_name=kernel if kernel is not None else (None if config.kernel == "auto" else config.kernel),
            placement=placement,
        )
        base_seed = config.seed if config.seed is not None else torch.initial_seed() % (2**63)
        self.window = NoiseWindow(self, self._binding, self._merged, base_seed)
        placement.attach(self)
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
    def base_seed(self) -> int:
        """The seed every draw derives from (``config.seed``, or one drawn from torch's seed; a resumed state's)."""
        return self.window.base_seed

    @property
    def is_perturbed(self) -> bool:
        """True between ``perturb`` and ``restore``: the noise window is open (also while suspended)."""
        return self.window.is_open

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
        return self.window.is_noisy

    @property
    def window_step(self) -> int | None:
        """The ``step`` the open noise window was drawn for (``perturb(step, ...)``), else ``None``."""
        return self.window.span[0] if self.window.is_open else None

    @property
    def current_strength(self) -> float:
        """Effective strength (``strength * coef(t)``) of the last ``perturb``."""
        return self.window.strength

    @property
    def buffer_bytes(self) -> int:
        """Bytes held by this engine's buffers (backups, scratch, per-row vectors, merged-space scratch)."""
        merged = self._merged.buffer_bytes if self._merged is not None else 0
        return sum(t.numel() * t.element_size() for t in self.buffers()) + merged

    def buffers(self) -> list[torch.Tensor]:
        """Every tensor this engine allocated for the selected parameters (plan buffers and prefetched draws)."""
        return self._binding.buffers()

    @property
    def restore_mode(self) -> str:
        """The restore this engine runs: ``config.restore``, with ``"auto"`` resolved to ``"swap"`` or ``"copy"``
        (`hf_smoothout.restore.auto`; decided again whenever the parameters' storage changes).

        Example:
            >>> from torch import nn
            >>> SmoothOut(nn.Linear(2, 2), SmoothOutConfig()).restore_mode
            'swap'
        """
        return self._binding.restore_name

    def describe(self) -> dict[str, Any]:
        """How this engine runs, as its seams chose: placement, restore, kernel, streams, worker threads, prefetch.

        Example:
            >>> from torch import nn
            >>> info = SmoothOut(nn.Linear(2, 2), SmoothOutConfig(prefetch="never")).describe()
            >>> info["placement"], info["restore"], info["kernel"], info["streams"], info["workers"], info["prefetch"]
            ('local', 'swap', 'inline', 1, 1, False)
        """
        bound = self._binding
        return {
            "placement": bound.placement.name,
            "restore": bound.restore_name,
            "kernel": bound.kernel.name,
            "law": bound.law.name,
            "streams": len(bound.plan.streams),
            "workers": bound.plan.workers,
            "prefetch": bound.prefetch is not None,
            "parameters": len(bound.plan.slots),
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

    def guard_deepspeed_step(self, deepspeed_engine: Any) -> None:
        """Make ``deepspeed_engine.step()`` restore the clean weights first.

        Under DeepSpeed, accelerate's ``accelerator.backward(loss)`` (and ``engine.backward`` + ``engine.step`` in a
        plain DeepSpeed loop) runs the optimizer step inside the window; restoring after it would write the
        pre-step weights back. Built on the DeepSpeed engine itself (what ``accelerator.prepare`` returned), the
        engine installs this guard on its own; `SmoothOutTrainer` installs it too.
        """
        restore_before_step(deepspeed_engine, self.restore)
        self.window.step_guarded = True

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
        return guards.replaced_slot(self._binding.plan.slots) is not None

    # ------------------------------------------------------------------ the noise window
    def perturb(self, step: int = 0, total_steps: int | None = None) -> float:
        """Open the noise window: add fresh noise of strength ``strength_at(step, total_steps)`` to the weights.

        Returns the effective strength. Raises ``RuntimeError`` if the weights are already
        perturbed (call ``restore`` first). If drawing fails midway the weights are restored
        before the error propagates.
        """
        strength = self.strength_at(step, total_steps)
        self.window.open(strength, step, total_steps)
        return strength

    def restore(self) -> None:
        """Remove the noise added by the last ``perturb`` and close the noise window (no-op when not perturbed).

        With ``restore="copy"``, ``"swap"`` or ``"auto"`` the weights are bit-identical to before ``perturb``. With
        ``"regenerate"`` the noise is redrawn from the same seeds and removed: equal up to rounding. With
        ``denoise=False`` the noise stays in the weights by design.

        Raises ``RuntimeError`` (after restoring) when a weight was written inside the window (see `suspend`).
        """
        self.window.close()

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
        self.window.suspend()

    def resume(self) -> None:
        """Put the open window's noise back into the weights after `suspend` (no-op unless suspended).

        The noisy weights are exactly those of the window's ``perturb``: taken from the kept buffers when the clean
        weights are untouched since `suspend` (their version counters and storage unchanged), else drawn again
        from the same draw (the noise is a function of seed, rank, stream and draw, and of the clean weights for
        the per-row laws).
        """
        self.window.resume()

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
            "base_seed": self.window.base_seed,
            "draws": self.window.draws + int(self.window.is_open),  # a suspended window counts: restore() closes it
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
        if self.window.is_open:
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
        self.window.base_seed, self.window.draws = state["base_seed"], state["draws"]
        return differences

    def close(self) -> None:
        """Stop the worker threads (the engine still works afterwards; threads restart on demand)."""
        self._binding.close()

    def detach(self) -> None:
        """Remove the merged-space forward wrappers from the model's LoRA layers (``space="lora_merged"``).

        The layers compute exactly as before the engine was built; this engine cannot perturb them again.
        """
        if self.is_noisy:
            raise RuntimeError("SmoothOut.detach() while the weights are perturbed; call restore() first.")
        self.restore()  # a suspended window: the weights are clean already
        if self._merged is not None:
            self._merged.close()
