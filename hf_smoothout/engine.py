"""The SmoothOut engine: perturb a model's weights with scaled noise and remove it again.

Works on any ``nn.Module`` and imports nothing from the Trainer, so a plain PyTorch or
Accelerate loop can use it directly.

Layout: the selected parameters are grouped by device and dtype, and each group is split into
a fixed number of *noise streams* balanced by size, each with its own generator (numpy's PCG64 for
uniform noise in CPU float32/float64, torch's generator otherwise). Before every draw a stream's generator is seeded
from ``(seed, rank, stream, draw index)``: the noise is a
function of those alone (not of the thread count), the regenerate restore re-seeds to redraw it
without saving generator states, and a checkpoint only needs the draw index. On CPU, where
random-number generation dominates and is single-threaded per generator, streams are drawn in
parallel by worker threads (`hf_smoothout.threads`), and nothing touches the weights again until
every worker has stopped, also on Ctrl-C.

Safety checks on every perturb, each a few attribute reads per parameter: a parameter whose storage
was replaced (``model.half(); model.float()``, ``p.data = ...``) is re-bound, a parameter object that
was replaced in its module (``load_state_dict(..., assign=True)``) is refused with an error, and a
parameter another engine holds noise in is refused (`hf_smoothout.ownership`). The first perturb at
each new peak strength checks that the noisy weights are finite.

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
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .adapters.deepspeed import deepspeed_engine_of, deepspeed_flattened, restore_before_step
from .adapters.dtensor import (
    check_fsdp_shared_uneven_shards,
    dim0_shard_span,
    is_dtensor,
    local_tensor,
    row_split_groups,
    rows_are_local,
)
from .config import SmoothOutConfig
from .guards import (
    check_no_forward_writes,
    check_restore_mode,
    module_tensor_attributes,
    validate_state,
    warn_if_implausible_strength,
)
from .laws import get_noise_law
from .lora_merged import MergedSpace, adapter_parameter_ids, find_lora_layers
from .noise import (
    ROW_NORM_EPS,
    NonFiniteNoiseError,
    draw_,
    row_length,
    row_norm_buffers,
)
from .ownership import claim, release
from .prefetch import NoisePrefetcher
from .restore_choice import EXACT_RESTORES, resolve_restore
from .schedules import noise_coefficient
from .seeding import ENGINE_STREAMS, ROW_BLOCK_STREAMS, derive_seed, draw_row_blocks_, seeded_generator
from .selection import SelectedParameter, select_parameters
from .threads import StreamRunner, interrupts_deferred

STREAMS_PER_GROUP = 8
"""Most noise streams per (device, dtype) group."""
ELEMENTS_PER_STREAM = 1 << 20
"""A group gets one stream per this many elements (1 to `STREAMS_PER_GROUP`): a function of the model alone, so
the noise never depends on the thread count, and small models do not pay for seeding 8 generators per draw."""


def streams_for(numel: int) -> int:
    """Noise streams of a (device, dtype) group of ``numel`` weights.

    Example:
        >>> streams_for(1_460_000), streams_for(110_000_000)
        (2, 8)
    """
    return max(1, min(STREAMS_PER_GROUP, -(-numel // ELEMENTS_PER_STREAM)))


# Scratch buffer of the regenerate / no-denoise path, per worker: at least one whole row, at most
# this many elements, and about 1/128 of the group's parameters in between.
_MAX_SCRATCH_ELEMENTS = 1 << 20
_MIN_SCRATCH_ELEMENTS = 1 << 14
_SCRATCH_FRACTION = 128
_MAX_SCRATCH_WORKERS = 2
# Below this many CPU elements, thread dispatch costs more than it saves.
_MIN_PARALLEL_ELEMENTS = 1 << 22
# prefetch="auto" draws ahead on a background thread for at most this many selected CPU weights (64 MiB fp32).
_AUTO_PREFETCH_ELEMENTS = 1 << 24
# A finiteness check of the noisy weights runs at the first perturb and whenever the effective strength
# exceeds this factor times the last checked one (a handful of checks per run, whatever the schedule).
_FINITE_CHECK_GROWTH = 2.0


@dataclass
class _Slot:
    """One selected parameter with its preallocated buffers."""

    name: str
    param: nn.Parameter
    row_axis: int
    data: torch.Tensor  # the parameter's tensor when the buffers were built (keeps that storage alive)
    module: nn.Module | None = None
    local_name: str = ""
    backup: torch.Tensor | None = None
    held: torch.Tensor | None = None  # copy restore, suspended window: the noisy values until resume
    norms: tuple[torch.Tensor, torch.Tensor] | None = None
    reduce_groups: tuple[Any, ...] = ()  # process groups splitting this parameter's rows (sharded, adapt=filter)
    index: int = 0  # position among the selected parameters (model order): names its sharded noise
    span: tuple[int, int, int] | None = None  # FSDP2 dim-0 shard: (global rows, first row here, rows here)
    global_shape: tuple[int, ...] = ()


@dataclass
class _Stream:
    """Parameters of one device and dtype that draw, in a fixed order, from one generator."""

    device: torch.device
    dtype: torch.dtype
    generator: torch.Generator | np.random.Generator
    stream_id: int
    slots: list[_Slot] = field(default_factory=list)
    chunks_done: int = 0
    collective: bool = False  # all-reduces row norms: drawn in the calling thread, in the same order on all ranks
    block_generator: torch.Generator | None = None  # sharded row blocks (their seeds do not involve the rank)
    block_scratch: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        return sum(s.data.numel() for s in self.slots)


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _distributed_rank_and_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _balanced_split(slots: list[_Slot], parts: int) -> list[list[_Slot]]:
    """Split ``slots`` into at most ``parts`` lists of similar total size, each in model order."""
    order = {id(s): i for i, s in enumerate(slots)}
    bins: list[list[_Slot]] = [[] for _ in range(min(parts, len(slots)))]
    loads = [0] * len(bins)
    for slot in sorted(slots, key=lambda s: -s.data.numel()):
        i = loads.index(min(loads))
        bins[i].append(slot)
        loads[i] += slot.data.numel()
    return [sorted(b, key=lambda s: order[id(s)]) for b in bins if b]


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
    ) -> None:
        if not isinstance(config, SmoothOutConfig):
            raise TypeError(f"config must be a SmoothOutConfig, got {type(config).__name__}.")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}.")
        default_rank, default_world = _distributed_rank_and_size()
        self.rank = default_rank if rank is None else int(rank)
        self.world_size = default_world if world_size is None else int(world_size)
        check_restore_mode(config, self.world_size)
        self.model = model
        self.config = config
        self._law = get_noise_law(config.adapt)
        self._selected: list[SelectedParameter] = select_parameters(model, config)
        self._merged: MergedSpace | None = None
        if config.space == "lora_merged":
            layers = [
                layer for layer in find_lora_layers(model) if config.selects_name(f"{layer.name}.base_layer.weight")
            ]
            if not layers:
                raise ValueError(
                    "SmoothOut: space='lora_merged' found no PEFT LoRA Linear layer in the model (or include/exclude "
                    "left none). Wrap the model with peft.get_peft_model(model, LoraConfig(...)) first, or use "
                    "space='trainable'."
                )
            adapters = adapter_parameter_ids(layers)
            self._selected = [s for s in self._selected if id(s.param) not in adapters]
            if config.enabled:
                self._merged = MergedSpace(layers, root=model)
        if config.enabled and config.denoise:
            check_no_forward_writes(self._selected)
        sharded = [s for s in self._selected if is_dtensor(s.param)]
        split = [s.name for s in sharded if not rows_are_local(s.param, s.row_axis)]
        copy_restore = config.denoise and config.restore in ("copy", "auto")  # auto: copy for sharded parameters
        if split and config.enabled and get_noise_law(config.adapt).row_scaled and not copy_restore:
            raise ValueError(
                f"SmoothOut: {split[0]!r} is sharded across its rows (e.g. GPT-2's Conv1D, stored [in, out], under "
                "FSDP2's Shard(0)); per-row scaling (adapt='filter') of split rows all-reduces the row norms, which "
                "is implemented for restore='copy' (what the default 'auto' runs there) with de-noising only. Use "
                "those settings, exclude the "
                "parameters with config.exclude, or use adapt='none' or 'weight' (element-wise, any sharding)."
            )
        self._sharded = bool(sharded)
        if sharded and config.enabled and config.restore == "swap":
            raise ValueError(
                f"SmoothOut: restore='swap' cannot point {sharded[0].name!r} at another buffer: it is sharded "
                "(FSDP2/DTensor), and its local shard belongs to FSDP's own storage. Use restore='copy' (bit-exact)."
            )
        base_seed = config.seed if config.seed is not None else torch.initial_seed() % (2**63)
        self.base_seed = base_seed
        self.num_threads = num_threads if num_threads is not None else max(1, torch.get_num_threads())
        self._streams: list[_Stream] = []
        self._slots: list[_Slot] = []
        self._slot_groups: list[list[_Slot]] = []  # per (device, dtype, rows split across ranks)
        self._copy_groups: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        self._scratch: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        self._runner: StreamRunner[_Stream] | None = None
        self._prefetcher: NoisePrefetcher | None = None
        self._prefetch_generators: dict[int, torch.Generator] = {}
        self._workers = 1
        self._inline_cpu = False
        # Sharded parameters: every rank holds other rows, so the forward pass gathers one global sample per step
        # (whatever independent_ranks says). FSDP2's dim-0 shards draw global row blocks seeded without the rank
        # (the same noise for any shard count); other layouts draw from this rank's streams.
        self._noise_rank = self.rank if (config.independent_ranks or self._sharded) else 0
        self._draws = 0  # noise draws so far: the only state a checkpoint needs
        self._perturbed = False  # the noise window is open: perturb ran, restore has not
        self._suspended = False  # ... but the noise is out of the weights (suspend), until resume
        self._held = False  # while suspended: the second buffers still hold this window's noisy weights
        self._window: tuple[int, int | None] = (0, None)  # (step, total_steps) the window was opened for
        self._window_versions: list[int] = []  # version counters of the weights once the noise was in
        self._suspend_versions: list[int] = []  # ... and once it was out again (suspend)
        self._swapped = False  # swap restore: the parameters point at the noisy buffers
        self._noop = False
        self._current_strength = 0.0
        self._checked_strength = 0.0  # largest strength whose noisy weights were checked to be finite
        self._restore = "copy"  # config.restore with "auto" resolved, at every (re)allocation
        self._allocate()
        self._step_guarded = False  # a DeepSpeed engine's step restores first (guard_deepspeed_step)
        deepspeed = deepspeed_engine_of(model)
        if deepspeed is not None and config.enabled:
            self.guard_deepspeed_step(deepspeed)
        warn_if_implausible_strength(config, self.parameters)

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
        return sum(t.numel() * t.element_size() for t in self._buffers()) + merged

    def _buffers(self) -> list[torch.Tensor]:
        tensors = [t for bufs in self._scratch.values() for t in bufs]
        tensors.extend(s.block_scratch for s in self._streams if s.block_scratch is not None)
        if self._prefetcher is not None:
            tensors.extend(self._prefetcher.buffers)
        for stream in self._streams:
            for slot in stream.slots:
                tensors.extend(t for t in (slot.backup, slot.held, *(slot.norms or ())) if t is not None)
        return tensors

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
    @property
    def restore_mode(self) -> str:
        """The restore this engine runs: ``config.restore``, with ``"auto"`` resolved to ``"swap"`` or ``"copy"``
        (`hf_smoothout.restore_choice`; decided again whenever the parameters' storage changes).

        Example:
            >>> from torch import nn
            >>> SmoothOut(nn.Linear(2, 2), SmoothOutConfig()).restore_mode
            'swap'
        """
        return self._restore

    def _uses_backup(self) -> bool:
        """Copy and swap restores keep a second buffer per parameter (copy: the clean values; swap: the noisy)."""
        return self.config.denoise and self._restore in ("copy", "swap")

    def _swaps(self) -> bool:
        return self.config.denoise and self._restore == "swap"

    def _clean(self, slot: _Slot) -> torch.Tensor:
        """Where the clean values are while perturbed."""
        return slot.data if self._swaps() else slot.backup  # type: ignore[return-value]

    def _noisy(self, slot: _Slot) -> torch.Tensor:
        """Where the noisy values are written (and raw draws land before that)."""
        return slot.backup if self._swaps() else slot.data  # type: ignore[return-value]

    def _allocate(self) -> None:
        """(Re)build streams and buffers for the parameters' current storage, device, dtype and shape."""
        if self._perturbed:
            raise RuntimeError("Cannot reallocate SmoothOut buffers while the weights are perturbed.")
        enabled = self.config.enabled
        if enabled and self._sharded:  # FSDP2 gathering a tied, unevenly sharded weight from a stale copy
            check_fsdp_shared_uneven_shards(self.model, [(sel.name, sel.param) for sel in self._selected])
        chosen = {id(sel.param) for sel in self._selected}
        others = [p for p in self.model.parameters() if id(p) not in chosen] + list(self.model.buffers())
        others += module_tensor_attributes(self.model)
        self._restore = resolve_restore(
            self.config, [sel.param for sel in self._selected], sharded=self._sharded, others=others
        )
        groups: dict[tuple[torch.device, torch.dtype], list[_Slot]] = {}
        self._slots = []
        for index, sel in enumerate(self._selected):
            p = sel.param
            slot = _Slot(sel.name, p, sel.row_axis, local_tensor(p), sel.module, sel.local_name, index=index)
            if self._sharded:
                slot.span, slot.global_shape = dim0_shard_span(p), tuple(p.shape)
            if enabled and self._uses_backup():
                slot.backup = torch.empty_like(slot.data, memory_format=torch.contiguous_format)
            if enabled and self._law.row_scaled:
                slot.norms = row_norm_buffers(slot.data, sel.row_axis)
                slot.reduce_groups = row_split_groups(p, sel.row_axis)
            groups.setdefault((p.device, p.dtype, bool(slot.reduce_groups)), []).append(slot)
            self._slots.append(slot)

        self._streams, self._copy_groups, self._scratch = [], [], {}
        self._slot_groups = list(groups.values())
        cpu_numel = sum(
            s.data.numel() for (device, _, _), slots in groups.items() if device.type == "cpu" for s in slots
        )
        cpu_streams = sum(
            min(len(slots), streams_for(sum(s.data.numel() for s in slots)))
            for (device, _, _), slots in groups.items()
            if device.type == "cpu"
        )
        self._workers = 1 if cpu_numel < _MIN_PARALLEL_ELEMENTS else max(1, min(self.num_threads, cpu_streams))
        if enabled and not self._uses_backup():
            self._workers = min(self._workers, _MAX_SCRATCH_WORKERS)
        stream_id = 0
        for (device, dtype, collective), slots in groups.items():
            for part in _balanced_split(slots, streams_for(sum(s.data.numel() for s in slots))):
                generator = torch.Generator(device=device)
                self._streams.append(_Stream(device, dtype, generator, stream_id, part, collective=collective))
                stream_id += 1
            if enabled and self._uses_backup():
                self._copy_groups.append(([s.data for s in slots], [s.backup for s in slots]))  # type: ignore[misc]
            if enabled and not self._uses_backup():
                total = sum(s.data.numel() for s in slots)
                largest_row = max(row_length(s.data, s.row_axis) for s in slots)
                size = max(
                    largest_row, min(_MAX_SCRATCH_ELEMENTS, max(_MIN_SCRATCH_ELEMENTS, total // _SCRATCH_FRACTION))
                )
                workers = self._workers if device.type == "cpu" else 1
                self._scratch[(device, dtype)] = [torch.empty(size, device=device, dtype=dtype) for _ in range(workers)]
        if self._runner is not None:
            self._runner.close()
        self._runner = StreamRunner(self._workers)
        # Everything drawn in this thread, on the CPU, tensor by tensor: draw and arithmetic fused per parameter.
        self._inline_cpu = (
            self._workers == 1
            and bool(self._streams)
            and all(s.device.type == "cpu" and not s.collective for s in self._streams)
            and all(slot.span is None for slot in self._slots)
        )
        if self._prefetcher is not None:
            self._prefetcher.close()
        self._prefetcher = None
        all_cpu = bool(self._streams) and all(s.device.type == "cpu" for s in self._streams)
        mode = self.config.prefetch
        spare_core = torch.get_num_threads() < _available_cores()  # measured: no gain when torch uses every core
        wanted = mode == "always" or (mode == "auto" and spare_core and cpu_numel <= _AUTO_PREFETCH_ELEMENTS)
        row_blocks = any(slot.span is not None for slot in self._slots)  # drawn per global row block instead
        if enabled and self._uses_backup() and all_cpu and wanted and not row_blocks:
            self._prefetcher = NoisePrefetcher([slot.data for slot in self._slots])

    def guard_deepspeed_step(self, deepspeed_engine: Any) -> None:
        """Make ``deepspeed_engine.step()`` restore the clean weights first.

        Under DeepSpeed, accelerate's ``accelerator.backward(loss)`` (and ``engine.backward`` + ``engine.step`` in a
        plain DeepSpeed loop) runs the optimizer step inside the window; restoring after it would write the
        pre-step weights back. Built on the DeepSpeed engine itself (what ``accelerator.prepare`` returned), the
        engine installs this guard on its own; `SmoothOutTrainer` installs it too.
        """
        restore_before_step(deepspeed_engine, self.restore)
        self._step_guarded = True

    def _check_deepspeed_guard(self) -> None:
        if self._step_guarded or not deepspeed_flattened([slot.param for slot in self._slots]):
            return
        raise RuntimeError(
            "SmoothOut: the model's weights live in DeepSpeed's flat buffers (ZeRO-1/2), but this engine was built "
            "on the inner module, so it cannot restore before DeepSpeed's optimizer step, which runs inside "
            "accelerator.backward() / engine.step(): every update would be undone. Build SmoothOut on the model "
            "accelerator.prepare (or deepspeed.initialize) returned, or call "
            "smoothout.guard_deepspeed_step(deepspeed_engine) once after preparing."
        )

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
        return self._replaced_slot() is not None

    def _replaced_slot(self) -> _Slot | None:
        """The first slot whose parameter object is no longer the one its module holds, else ``None``."""
        for slot in self._slots:
            if slot.module is not None and slot.module._parameters.get(slot.local_name) is not slot.param:
                return slot
        return None

    def _live(self, slot: _Slot) -> torch.Tensor:
        """The tensor holding ``slot``'s values now: the local shard of a DTensor parameter, else the parameter."""
        return local_tensor(slot.param) if self._sharded and is_dtensor(slot.param) else slot.param

    def _check_bindings(self) -> None:
        """Re-bind the buffers if a parameter's storage changed; refuse a parameter object that was replaced."""
        replaced = self._replaced_slot()
        if replaced is not None:
            raise RuntimeError(
                f"SmoothOut: the model's parameter {replaced.name!r} was replaced by a different Parameter object "
                "after this engine was built (e.g. load_state_dict(..., assign=True), or assigning "
                "module.weight = nn.Parameter(...)). The engine would perturb the old object, which no longer "
                "takes part in the forward pass. Build a new SmoothOut(model, config) after replacing "
                "parameters (and a new optimizer, which holds the old objects too)."
            )
        stale = False
        for slot in self._slots:
            data, live = slot.data, self._live(slot)
            if (
                live.data_ptr() != data.data_ptr()
                or live.shape != data.shape
                or live.dtype != data.dtype
                or live.device != data.device
                or live.stride() != data.stride()
            ):
                stale = True
        if stale:
            self._allocate()

    def _run_streams(self, work: Callable[[_Stream, int], None], *, cancellable: bool = False) -> None:
        """Run ``work(stream, worker)`` on every stream: CPU streams on worker threads, others in this thread.

        Returns or raises only once no worker touches the weights any more (also on Ctrl-C); the first
        error is raised then. ``cancellable``: on an error or interrupt, skip the streams not yet started.
        """
        assert self._runner is not None
        cpu = [s for s in self._streams if s.device.type == "cpu" and not s.collective]
        others = [s for s in self._streams if s.device.type != "cpu" or s.collective]
        workers = self._workers if cpu else 1
        loads: list[list[_Stream]] = [[] for _ in range(workers)]
        sizes = [0] * workers
        for stream in sorted(cpu, key=lambda s: -s.numel):
            i = sizes.index(min(sizes))
            loads[i].append(stream)
            sizes[i] += stream.numel
        self._runner.run([load for load in loads if load], work, inline=others, cancellable=cancellable)

    def _all_finite(self, noisy: bool = False) -> bool:
        """Whether every selected weight (``noisy``: as the forward pass sees it now) is finite (one max-abs
        reduction per tensor, one sync per device)."""
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for slot in self._slots:
            tensor = self._noisy(slot) if noisy else slot.data
            if tensor.numel():  # a shard may hold no rows (a 2-row head over 4 ranks): nothing to check there
                by_device.setdefault(tensor.device, []).append(tensor)
        finite = True
        for tensors in by_device.values():
            peaks = torch._foreach_norm(tensors, ord=math.inf)
            finite = finite and bool(torch.stack([p.float() for p in peaks]).isfinite().all())
        if self._sharded and self.world_size > 1 and torch.distributed.is_initialized():
            flag = torch.tensor([1.0 if finite else 0.0], device=self._slots[0].data.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)  # every rank decides alike
            finite = bool(flag.item() == 1.0)
        return finite

    def _first_non_finite(self) -> str:
        for slot in self._slots:
            if not bool(torch.isfinite(self._noisy(slot)).all()):
                return slot.name
        return "?"

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
        self._window = (step, total_steps)
        self._suspended = self._held = False
        self._window_versions = []  # set once the noise is in: a failed perturb checks no writes
        self._noop = strength == 0.0 or (not self._selected and self._merged is None)
        if self._noop:
            self._perturbed = True
            return strength
        with interrupts_deferred() as interrupt:  # Ctrl-C during perturb: restore, then raise it
            self._check_bindings()
            self._check_deepspeed_guard()
            claim(self._claimed_parameters(), self)
            try:
                self._perturb_claimed(strength)
            except BaseException:
                if self._perturbed:
                    self.restore()
                else:
                    release((param for _, param in self._claimed_parameters()), self)
                raise
            self._window_versions = self._versions()
            if interrupt.pending:
                self.restore()
        return strength

    def _claimed_parameters(self) -> list[tuple[str, torch.Tensor]]:
        claimed = [(slot.name, slot.param) for slot in self._slots]
        if self._merged is not None:
            claimed += [(f"{layer.name}.base_layer.weight", layer.weight) for layer in self._merged.layers]
        return claimed

    def _perturb_claimed(self, strength: float) -> None:
        with torch.no_grad():
            check_finite = strength > _FINITE_CHECK_GROWTH * self._checked_strength
            clean_finite = self._all_finite() if check_finite else False
            if self._uses_backup() and not self._swaps():
                for params, backups in self._copy_groups:
                    torch._foreach_copy_(backups, params)
            for stream in self._streams:
                self._seed_stream(stream)
                stream.chunks_done = 0
            self._perturbed = True
            if self._uses_backup():
                prefetched = self._prefetcher.take(self._prefetch_tag(self._draws)) if self._prefetcher else None
                if prefetched is None and self._inline_cpu:
                    self._draw_and_apply_inline(strength)
                elif prefetched is None:
                    # Random numbers on the worker threads (numpy and torch's CPU generator run one thread each and
                    # release the GIL), straight into the parameters; then the arithmetic in this thread, where
                    # torch's intra-op threads are not competing with the workers' own.
                    self._run_streams(self._draw_stream, cancellable=True)
                    self._apply_noise(strength)
                else:
                    self._apply_noise(strength, prefetched)
                if self._swaps():  # the forward and backward pass now read the noisy buffers
                    for slot in self._slots:
                        slot.param.data = slot.backup
                    self._swapped = True
                if self._prefetcher is not None:  # the next draw, on the background thread, during this forward
                    self._prefetcher.start(self._prefetch_tag(self._draws + 1), self._prefetch_fill(self._draws + 1))
            else:
                self._run_streams(
                    lambda stream, worker: self._perturb_chunks(stream, worker, strength), cancellable=True
                )
            self._arm_merged(strength, check_finite=check_finite)
            if clean_finite:
                if not self._all_finite(noisy=True):
                    raise NonFiniteNoiseError(
                        f"SmoothOut: noise of strength {strength:g} (adapt={self.config.adapt!r}) made finite "
                        f"weights non-finite (first in {self._first_non_finite()!r}): the strength is far too "
                        "large for these weights. Lower it (typical: 1e-3 to 5e-2 with adapt='filter')."
                    )
                self._checked_strength = strength

    def _arm_merged(self, strength: float, *, check_finite: bool) -> None:
        if self._merged is not None:
            self._merged.arm(
                adapt=self.config.adapt,
                distribution=self.config.distribution,
                strength=strength,
                base_seed=self.base_seed,
                rank=self._noise_rank,
                draw=self._draws,
                check_finite=check_finite,
            )

    def _seed_stream(self, stream: _Stream) -> None:
        seed = derive_seed(self.base_seed, self._noise_rank, ENGINE_STREAMS.id(stream.stream_id), self._draws)
        torch_generator = stream.generator if isinstance(stream.generator, torch.Generator) else None
        stream.generator = seeded_generator(
            seed, stream.device, stream.dtype, self.config.distribution, torch_generator
        )

    def _draw_stream(self, stream: _Stream, worker: int) -> None:
        """Fill every parameter of ``stream`` with raw draws ``u`` (the clean values are in the backups).

        An FSDP2 shard draws its global row blocks from seeds without the rank (the same noise for any shard
        count); every other tensor draws from the stream's generator.
        """
        for slot in stream.slots:
            if slot.span is None:
                draw_(self._noisy(slot), self.config.distribution, stream.generator)
                continue
            if stream.block_generator is None:
                stream.block_generator = torch.Generator(device=stream.device)
            seed = derive_seed(self.base_seed, 0, ROW_BLOCK_STREAMS.id(slot.index), self._draws)
            draw_row_blocks_(
                self._noisy(slot),
                slot.span,
                slot.global_shape,
                seed,
                self.config.distribution,
                lambda numel, stream=stream: self._block_scratch(stream, numel),
                stream.block_generator,
            )

    @staticmethod
    def _block_scratch(stream: _Stream, numel: int) -> torch.Tensor:
        scratch = stream.block_scratch
        if scratch is None or scratch.numel() < numel:
            scratch = torch.empty(numel, device=stream.device, dtype=stream.dtype)
            stream.block_scratch = scratch
        return scratch[:numel]

    def _prefetch_tag(self, draw: int) -> tuple[Any, ...]:
        return (self.base_seed, self._noise_rank, draw, self.config.distribution)

    def _prefetch_fill(self, draw: int) -> Callable[[list[torch.Tensor]], None]:
        """Fill one buffer per slot with draw ``draw``'s raw numbers: the same as `_draw_stream` would draw."""
        base_seed, rank, distribution = self.base_seed, self._noise_rank, self.config.distribution
        index = {id(slot): i for i, slot in enumerate(self._slots)}
        streams = [(stream, [index[id(slot)] for slot in stream.slots]) for stream in self._streams]

        def fill(buffers: list[torch.Tensor]) -> None:
            for stream, positions in streams:
                seed = derive_seed(base_seed, rank, ENGINE_STREAMS.id(stream.stream_id), draw)
                own = self._prefetch_generators.setdefault(stream.stream_id, torch.Generator(device=stream.device))
                generator = seeded_generator(seed, stream.device, stream.dtype, distribution, own)
                for position in positions:
                    draw_(buffers[position], distribution, generator)

        return fill

    def _apply_noise(self, strength: float, prefetched: list[torch.Tensor] | None = None) -> None:
        """``param = backup + multiplier * u`` for every slot, ``u`` being what `_draw_stream` left in it (or the
        prefetched buffer of the slot)."""
        draws = {id(slot): self._noisy(slot) for slot in self._slots}
        if prefetched is not None:
            draws = {id(slot): u for slot, u in zip(self._slots, prefetched, strict=True)}
        law = self._law
        if not law.row_scaled:
            for slot in self._slots:
                law.apply_(self._noisy(slot), self._clean(slot), draws[id(slot)], strength, row_axis=slot.row_axis)
            return
        for slots in self._slot_groups:
            if slots and slots[0].reduce_groups:  # rows split across ranks: same order on every rank
                for slot in slots:
                    u = draws[id(slot)]
                    scale = _split_row_scale(slot, self._clean(slot), u, strength, normalize=law.normalizes_draw)
                    torch.addcmul(self._clean(slot), u, scale, out=self._noisy(slot))
                continue
            scales = law.row_scales_(
                [self._clean(slot) for slot in slots],
                [draws[id(slot)] for slot in slots],
                strength,
                [slot.row_axis for slot in slots],
                [slot.norms for slot in slots],  # type: ignore[misc]
            )
            for slot, scale in zip(slots, scales, strict=True):
                torch.addcmul(self._clean(slot), draws[id(slot)], scale, out=self._noisy(slot))

    def _draw_and_apply_inline(self, strength: float) -> None:
        """`_draw_stream` then `_apply_noise`, one parameter at a time, in this thread (CPU, no worker threads).

        The same numbers and the same arithmetic as the two passes over all parameters; each parameter's draw is
        still in cache when its row norms and fused add read it, and no ``_foreach`` call pays its CPU overhead.
        """
        cfg = self.config
        for stream in self._streams:
            for slot in stream.slots:
                u = self._noisy(slot)
                draw_(u, cfg.distribution, stream.generator)
                self._law.apply_(u, self._clean(slot), u, strength, row_axis=slot.row_axis, buffers=slot.norms)

    def _perturb_chunks(self, stream: _Stream, worker: int, strength: float) -> None:
        """No backup (regenerate restore, or no de-noising): draw chunk by chunk into scratch and add in place."""
        cfg = self.config
        scratch = self._scratch[(stream.device, stream.dtype)][worker]
        for slot, weight, draw, norms in _chunks(stream, scratch):
            draw_(draw, cfg.distribution, stream.generator)
            self._law.apply_(weight, weight, draw, strength, row_axis=slot.row_axis, buffers=norms)
            stream.chunks_done += 1

    def restore(self) -> None:
        """Remove the noise added by the last ``perturb`` and close the noise window (no-op when not perturbed).

        With ``restore="copy"``, ``"swap"`` or ``"auto"`` the weights are bit-identical to before ``perturb``. With
        ``"regenerate"`` the noise is redrawn from the saved generator states and removed:
        equal up to rounding. With ``denoise=False`` the noise stays in the weights by design.

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
                    if self._uses_backup():
                        self._take_noise_out(keep=False)
                finally:
                    self._close_window()
                raise
            if error is not None:
                self._close_window()
            else:
                self._suspended = True
                self._suspend_versions = self._versions()
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
        if self._noop or not self.config.denoise:
            self._suspended = False
            return
        if not (self._held and self._untouched_since_suspend()):
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
                if self._swaps():
                    for slot in self._slots:
                        slot.param.data = slot.backup
                    self._swapped = True
                elif self._slots:
                    torch._foreach_copy_([s.data for s in self._slots], [s.held for s in self._slots])
            self._suspended = False
            self._window_versions = self._versions()
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

    def _versions(self) -> list[int]:
        """Version counters of the tensors holding the selected weights (bumped by every in-place write)."""
        return [self._live(slot)._version for slot in self._slots]

    def _untouched_since_suspend(self) -> bool:
        """Whether no selected weight was written, re-bound or replaced since `suspend`."""
        if self._replaced_slot() is not None or len(self._suspend_versions) != len(self._slots):
            return False
        for slot, version in zip(self._slots, self._suspend_versions, strict=True):
            live = self._live(slot)
            if live.data_ptr() != slot.data.data_ptr() or live._version != version:
                return False
        return True

    def _take_noise_out(self, *, keep: bool) -> RuntimeError | None:
        """Make the weights clean again (bit-exactly with a backup); ``keep``: leave the noisy weights in the second
        buffers for `resume`. Returns the error to raise once the window's state is settled, or ``None``."""
        if self._merged is not None:
            self._merged.disarm()  # nothing to undo: merged-space noise never touches a weight
        if self._noop or not self.config.denoise:
            return None
        moved = self._moved_while_perturbed()
        written = self._written_in_window(moved)
        unrecoverable: str | None = None
        with torch.no_grad():
            if self._swaps():  # back at the untouched clean tensors: nothing to copy; the noisy ones stay in backup
                for slot in self._slots:
                    if id(slot) not in moved:
                        slot.param.data = slot.data
                self._swapped = False
            elif self._uses_backup():
                if keep and not moved and self._slots:
                    held = [self._held_buffer(slot) for slot in self._slots]
                    torch._foreach_copy_(held, [s.data for s in self._slots])
                for params, backups in self._copy_groups:
                    torch._foreach_copy_(params, backups)
            else:
                self._run_streams(self._regenerate_and_remove)
            # A wrapper that moved a weight to new storage while perturbed, copying it (FSDP2 re-pads a shard
            # at its first forward): the copy holds exactly the noisy values, so the clean ones go there too.
            for slot, live, recoverable in moved.values():
                if recoverable:
                    live.copy_(slot.data)
                elif unrecoverable is None:
                    unrecoverable = slot.name
        self._held = keep and not moved and self._uses_backup()
        if unrecoverable is not None:
            return RuntimeError(
                f"SmoothOut: the storage of {unrecoverable!r} was replaced while the weights were perturbed, and its "
                "new values are no plain copy of the noisy ones (model.to(dtype), .half(), load_state_dict(..., "
                "assign=True) or p.data = ... between perturb and restore): that noise cannot be removed any more. "
                "Convert or load the model only while SmoothOut is not perturbed (outside perturbed() and "
                "training_step)."
            )
        if written is not None:
            return RuntimeError(
                f"SmoothOut: {written!r} was written while the noise was in the weights (inside the forward or "
                "backward pass): an optimizer step inside backward (a register_post_accumulate_grad_hook calling "
                "optimizer.step(), LOMO-style), nn.Embedding(max_norm=...) renormalizing rows, or another in-place "
                "update. Removing the noise would silently undo or corrupt that write, so SmoothOut stops here, "
                "the noise removed (with copy or swap the weights are back at their values before the noise and "
                "that write is lost). Step the optimizer after the "
                "backward pass, set the embedding's max_norm=None, or leave the parameter out with config.exclude."
            )
        return None

    def _written_in_window(self, moved: Mapping[int, Any]) -> str | None:
        """The first selected weight written in place since the noise went in (its version counter moved)."""
        if len(self._window_versions) != len(self._slots):
            return None
        for slot, version in zip(self._slots, self._window_versions, strict=True):
            if id(slot) not in moved and self._live(slot)._version != version:
                return slot.name
        return None

    def _held_buffer(self, slot: _Slot) -> torch.Tensor:
        if slot.held is None or slot.held.shape != slot.data.shape or slot.held.dtype != slot.data.dtype:
            slot.held = torch.empty_like(slot.data, memory_format=torch.contiguous_format)
        return slot.held

    def _moved_while_perturbed(self) -> dict[int, tuple[_Slot, torch.Tensor, bool]]:
        """Parameters whose storage is not the one perturb left them on (copy/regenerate: their own; swap: the noisy
        buffer, once the parameters were pointed at it): ``id(slot) -> (slot, live tensor, recoverable)``, where
        recoverable means the new storage holds exactly the noisy values (checked before anything is restored)."""
        swapped = self._swaps() and self._swapped
        moved: dict[int, tuple[_Slot, torch.Tensor, bool]] = {}
        for slot in self._slots:
            live = self._live(slot)
            expected = slot.backup if swapped else slot.data
            assert expected is not None
            if live.numel() and live.data_ptr() != expected.data_ptr():
                same = live.shape == expected.shape and live.dtype == expected.dtype and live.device == expected.device
                live_data = live.data if isinstance(live, nn.Parameter) else live
                moved[id(slot)] = (slot, live_data, same and bool(torch.equal(live_data, expected)))
        return moved

    def _regenerate_and_remove(self, stream: _Stream, worker: int) -> None:
        cfg = self.config
        self._seed_stream(stream)
        scratch = self._scratch[(stream.device, stream.dtype)][worker]
        remaining = stream.chunks_done
        for _slot, weight, draw, norms in _chunks(stream, scratch):
            if remaining == 0:
                break
            draw_(draw, cfg.distribution, stream.generator)
            self._law.remove_(weight, draw, self._current_strength, row_scale=None if norms is None else norms[0])
            remaining -= 1
        stream.chunks_done = 0

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
        validate_state(state)
        seed, draws = state["base_seed"], state["draws"]
        differences = []
        saved = state.get("config")
        if isinstance(saved, Mapping):
            current = self.config.to_dict()
            for name in SmoothOutConfig.field_names():
                if name == "seed" or name not in saved or saved[name] == current[name]:
                    continue
                if name == "prefetch" or (name == "restore" and {saved[name], current[name]} <= EXACT_RESTORES):
                    continue  # the same noise and the same weights either way: the run does not change
                differences.append(f"{name}: {saved[name]!r} -> {current[name]!r}")
        if self.config.seed is not None and self.config.seed != seed:
            differences.append(f"seed: {seed!r} -> {self.config.seed!r} (the saved seed {seed} is kept)")
        if differences:
            warnings.warn(
                "SmoothOut: resuming a noise state saved with other settings ("
                + "; ".join(differences)
                + "). The run continues with the current settings and will differ from an uninterrupted run.",
                UserWarning,
                stacklevel=2,
            )
        self.base_seed = seed
        self._draws = draws
        return differences

    def close(self) -> None:
        """Stop the worker threads (the engine still works afterwards; threads restart on demand)."""
        if self._runner is not None:
            self._runner.close()
        if self._prefetcher is not None:
            self._prefetcher.close()

    def detach(self) -> None:
        """Remove the merged-space forward wrappers from the model's LoRA layers (``space="lora_merged"``).

        The layers compute exactly as before the engine was built; this engine cannot perturb them again.
        """
        if self.is_noisy:
            raise RuntimeError("SmoothOut.detach() while the weights are perturbed; call restore() first.")
        self.restore()  # a suspended window: the weights are clean already
        if self._merged is not None:
            self._merged.close()


def _split_row_scale(
    slot: _Slot, clean: torch.Tensor, draw: torch.Tensor, strength: float, *, normalize: bool = True
) -> torch.Tensor:
    """The per-row multiplier of ``filter`` (``normalize``) or ``filter_std`` for rows split across ranks: partial
    squared norms all-reduced first."""
    assert slot.norms is not None
    scale, draw_norm = slot.norms
    dims = tuple(d for d in range(clean.ndim) if d != slot.row_axis)
    torch.sum(clean.square(), dim=dims, keepdim=True, out=scale)
    torch.sum(draw.square(), dim=dims, keepdim=True, out=draw_norm)
    both = torch.stack([scale, draw_norm])
    for group in slot.reduce_groups:
        torch.distributed.all_reduce(both, group=group)
    torch.sqrt(both[0], out=scale)
    if not normalize:  # filter_std: the row length of the whole (global) row
        return scale.mul_(strength / math.sqrt(row_length(slot.param, slot.row_axis)))
    torch.sqrt(both[1], out=draw_norm)
    return scale.div_(draw_norm.add_(ROW_NORM_EPS)).mul_(strength)


def _chunks(
    stream: _Stream, scratch: torch.Tensor
) -> Iterator[tuple[_Slot, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]]:
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
