"""Validated configuration of the SmoothOut method.

Example:
    >>> from hf_smoothout import SmoothOutConfig
    >>> cfg = SmoothOutConfig(strength=0.01, adapt="filter", schedule="anneal")
    >>> cfg.samples
    1
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from .laws import list_noise_laws

ADAPT_MODES = tuple(list_noise_laws())
DISTRIBUTIONS = ("uniform", "gaussian")
SCHEDULES = ("constant", "anneal", "tanh", "cosine")
RESTORE_MODES = ("auto", "copy", "regenerate", "swap")
NOISE_EVERY = ("micro_batch", "step")
SPACES = ("trainable", "lora_merged")
PREFETCH_MODES = ("auto", "always", "never")
KERNEL_MODES = ("auto", "inline", "threads", "chunked", "triton")
"""``"auto"`` and every kernel of `hf_smoothout.kernels.KERNELS` (a test keeps the two in step)."""

Adapt = str  # a name in hf_smoothout.laws.NOISE_LAWS
Distribution = Literal["uniform", "gaussian"]
Schedule = Literal["constant", "anneal", "tanh", "cosine"]
Restore = Literal["auto", "copy", "regenerate", "swap"]
NoiseEvery = Literal["micro_batch", "step"]
Space = Literal["trainable", "lora_merged"]
Prefetch = Literal["auto", "always", "never"]
Kernel = Literal["auto", "inline", "threads", "chunked", "triton"]


_SEED_LIMIT = 2**64


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"SmoothOutConfig.{name}={value!r} is not valid; allowed values: {', '.join(allowed)}.")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(
            f"SmoothOutConfig.{name}={value!r} is not valid; it must be True or False (got a {type(value).__name__})."
        )


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"SmoothOutConfig.{name}={value!r} is not valid; it must be a number.")
    return float(value)


def _patterns(name: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    patterns = (value,) if isinstance(value, str) else value
    try:
        patterns = tuple(patterns)
    except TypeError:
        raise ValueError(
            f"SmoothOutConfig.{name}={value!r} is not valid; it must be a regular expression or a list of them."
        ) from None
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(
                f"SmoothOutConfig.{name} holds {pattern!r} ({type(pattern).__name__}); every entry must be a string "
                "(a regular expression matched against parameter names)."
            )
    return patterns


@dataclass(frozen=True)
class SmoothOutConfig:
    """Every knob of SmoothOut / AdaSmoothOut (Wen et al., arXiv 1805.07898).

    The config is immutable and validated once, at construction: derive a changed copy with
    ``dataclasses.replace(config, strength=...)`` (validated again).

    Attributes:
        strength: the noise strength ``a``. With ``adapt="filter"`` each row's noise vector has
            L2 norm ``a * ||w_row||``; with ``"none"`` the noise is ``U(-a, a)`` (or ``a * N(0, 1)``);
            with ``"weight"`` it is ``a * w * U(-1, 1)`` element-wise. ``0`` disables the method.
        adapt: noise scaling: ``"filter"`` (AdaSmoothOut, per output row/filter), ``"filter_std"``
            (per row, not normalized by the draw: ``tau_row = a * ||w_row|| / sqrt(n) * u_row``; with Gaussian
            noise that is Flat-LoRA's law, row norm about ``a * ||w_row||``), ``"none"`` (plain SmoothOut box)
            or ``"weight"`` (element-wise, relative to each weight).
        distribution: ``"uniform"`` (the paper's choice, the default) or ``"gaussian"``. In our 5-seed
            ghost-batch study Gaussian minus uniform AdaSmoothOut was +0.16 [-0.15, +0.47] points: within the
            seed spread, so the default stays uniform (docs/results.md).
        schedule: multiplier of ``strength`` over training: ``"constant"``, ``"anneal"``
            (``(1 + t) ** (-anneal_index / 2)``), ``"tanh"`` (ramps up, ``tanh_scale`` steepness) or
            ``"cosine"`` (ramps up from 0 to 1 as ``(1 - cos(pi * t / T)) / 2``, Flat-LoRA's schedule).
        anneal_index: exponent of the ``"anneal"`` schedule.
        tanh_scale: steepness of the ``"tanh"`` schedule.
        samples: K noisy copies per micro-batch; their gradients are averaged.
        denoise: remove the noise after the backward pass (the method). ``False`` leaves the
            noise in the weights (classic weight-noise injection, for ablations only).
        restore: how the weights get clean again after the backward pass. ``"auto"`` (default): ``"swap"`` where
            that is proven harmless (every selected parameter on the CPU, a plain tensor owning its whole contiguous
            storage, shared with no other tensor of the model), else ``"copy"``; see `hf_smoothout.restore.auto`,
            and ``SmoothOut.restore_mode`` for the one chosen. Both are exact and train bit-identically. ``"copy"``
            restores bit-exactly from a preallocated backup (one extra copy of the selected parameters). ``"swap"``
            writes the noisy weights into a second buffer and points each parameter at it for the forward and
            backward pass, then back at its untouched clean tensor: exact by construction and two copy passes
            cheaper than ``"copy"``, same memory; refused for sharded (FSDP2) parameters and under DeepSpeed (their
            storage belongs to flat buffers), and wrong under CUDA-graph capture
            (``torch.compile(mode="reduce-overhead")``), which replays recorded addresses. ``"regenerate"`` keeps
            no backup and regenerates the
            noise from the saved generator state to remove it: **not bit-exact** (rounding drift of a few ulps per
            step) and refused when ranks draw different noise.
        skip_norm_layers: leave parameters of normalization layers (BatchNorm, LayerNorm,
            GroupNorm, RMSNorm, ...) untouched. (The authors' script skips only BatchNorm.)
        skip_bias: leave parameters named ``*bias`` untouched.
        include: if given, only parameters whose name matches one of these regular expressions
            (``re.search``) are perturbed. Stored as a tuple.
        exclude: parameters whose name matches one of these regular expressions are skipped.
            Stored as a tuple.
        seed: seed of the noise generator, an integer in ``[0, 2**64)``; ``None`` derives it from
            torch's initial seed (the Trainer passes ``TrainingArguments.seed``).
        independent_ranks: each distributed rank draws different noise (seed offset by rank),
            so data-parallel training averages ``world_size`` noise samples per step. Sharded
            (FSDP2/DTensor) parameters give one global sample per micro-batch whatever this says: each
            rank perturbs the rows it holds and the forward pass gathers them; FSDP2's dim-0 shards draw
            blocks of global rows from seeds without the rank, so the noise does not depend on the
            shard count.
        noise_every: when the Trainer draws fresh noise: ``"micro_batch"`` (the paper and the authors'
            script: every micro-batch of a gradient-accumulation window, i.e. every ghost chunk, gets its
            own draw) or ``"step"`` (one draw held for the whole window and removed before clipping and
            the optimizer step: 1/accumulation of the noise cost). Read by `SmoothOutTrainer`; a plain
            loop decides this itself by where it calls ``perturb``/``restore``.
        space: which weights get noise: ``"trainable"`` (the selected trainable parameters; with a PEFT
            LoRA model, the adapters) or ``"lora_merged"`` (every PEFT LoRA ``Linear`` layer's effective
            weight ``W + s*B*A``, scaled against its merged rows, while gradients reach only the adapters;
            the base weight is never written; other trainable parameters such as a classifier head follow
            the per-parameter rules). See `hf_smoothout.lora_merged`.
        prefetch: CPU only, with a copy or swap restore: draw the next micro-batch's random numbers on a
            background thread while the current one computes (`hf_smoothout.prefetch`; the same numbers,
            +1x selected-parameter memory). ``"auto"``: when the selected weights are on CPU, at most 16.8M
            (64 MiB in fp32), and torch leaves a core free (``torch.get_num_threads()`` below the cores this
            process may use; with every core busy the background thread only competes); ``"always"``; ``"never"``.
        kernel: how each draw becomes noisy weights (`hf_smoothout.kernels`). ``"auto"``: the engine's choice among
            the kernels that draw the reference numbers (``inline``, ``threads``, ``chunked``; only speed differs).
            ``"triton"``: the fused counter-based GPU kernel (one pass per weight, the noise never stored; its own
            random numbers, the same law), opt-in until checked on a GPU; needs ``triton`` (the ``[gpu]`` extra).

    Example:
        >>> SmoothOutConfig(strength=0.005, adapt="none", samples=2).to_dict()["samples"]
        2
        >>> import dataclasses
        >>> dataclasses.replace(SmoothOutConfig(), strength=0.02).strength
        0.02
    """

    strength: float = 0.01
    adapt: Adapt = "filter"
    distribution: Distribution = "uniform"
    schedule: Schedule = "constant"
    anneal_index: float = 0.55
    tanh_scale: float = 10.0
    samples: int = 1
    denoise: bool = True
    restore: Restore = "auto"
    skip_norm_layers: bool = True
    skip_bias: bool = False
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    seed: int | None = None
    independent_ranks: bool = True
    noise_every: NoiseEvery = "micro_batch"
    space: Space = "trainable"
    prefetch: Prefetch = "auto"
    kernel: Kernel = "auto"
    _compiled: dict[str, tuple[re.Pattern[str], ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if isinstance(self.strength, bool) or not isinstance(self.strength, numbers.Real):
            raise ValueError(f"SmoothOutConfig.strength must be a number, got {self.strength!r}.")
        put("strength", float(self.strength))
        if not math.isfinite(self.strength) or self.strength < 0.0:
            raise ValueError(
                f"SmoothOutConfig.strength={self.strength!r} is not valid; it must be a finite number >= 0 "
                "(0 disables SmoothOut; typical values are 1e-3 to 5e-2 with adapt='filter')."
            )
        _check_choice("adapt", self.adapt, ADAPT_MODES)
        _check_choice("distribution", self.distribution, DISTRIBUTIONS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("restore", self.restore, RESTORE_MODES)
        _check_choice("noise_every", self.noise_every, NOISE_EVERY)
        _check_choice("space", self.space, SPACES)
        _check_choice("prefetch", self.prefetch, PREFETCH_MODES)
        _check_choice("kernel", self.kernel, KERNEL_MODES)
        if self.space == "lora_merged" and not self.denoise:
            raise ValueError(
                "SmoothOutConfig: space='lora_merged' needs denoise=True: merged-space noise is never written into "
                "the weights, so there is no noise to leave behind. Use space='trainable' for the ablation."
            )
        for name in ("anneal_index", "tanh_scale"):
            value = _number(name, getattr(self, name))
            if not (math.isfinite(value) and value > 0.0):
                raise ValueError(f"SmoothOutConfig.{name}={value!r} is not valid; it must be a finite number > 0.")
            put(name, value)
        for name in ("denoise", "skip_norm_layers", "skip_bias", "independent_ranks"):
            _check_bool(name, getattr(self, name))
        if isinstance(self.samples, bool) or not isinstance(self.samples, numbers.Integral) or self.samples < 1:
            raise ValueError(f"SmoothOutConfig.samples={self.samples!r} is not valid; it must be an integer >= 1.")
        put("samples", int(self.samples))
        if self.noise_every == "step" and self.samples > 1:
            raise ValueError(
                "SmoothOutConfig.samples > 1 needs noise_every='micro_batch': several noisy copies per micro-batch "
                "and one draw held for the whole accumulation window contradict each other."
            )
        if self.restore == "swap" and not self.denoise:
            raise ValueError(
                "SmoothOutConfig: restore='swap' needs denoise=True (it points the parameters back at their clean "
                "tensors). Use restore='copy' for the no-de-noising ablation."
            )
        if not self.denoise and self.samples > 1:
            raise ValueError(
                "SmoothOutConfig.samples > 1 needs denoise=True: without de-noising every extra sample would "
                "add noise on top of the previous one. Set samples=1 or denoise=True."
            )
        if self.adapt == "weight" and self.restore == "regenerate" and self.strength >= 1.0:
            raise ValueError(
                "SmoothOutConfig: adapt='weight' with restore='regenerate' needs strength < 1 (the weight is "
                f"recovered by dividing by 1 + a*u); got strength={self.strength}. Use restore='copy'."
            )
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
                raise ValueError(f"SmoothOutConfig.seed={self.seed!r} is not valid; it must be None or an integer.")
            if not 0 <= self.seed < _SEED_LIMIT:
                raise ValueError(
                    f"SmoothOutConfig.seed={self.seed!r} is out of range; it must be in [0, 2**64) (the noise seed "
                    "is a 64-bit integer, and larger values would silently alias smaller ones)."
                )
            put("seed", int(self.seed))
        compiled: dict[str, tuple[re.Pattern[str], ...]] = {}
        for name in ("include", "exclude"):
            patterns = _patterns(name, getattr(self, name))
            put(name, patterns)
            if patterns is None:
                continue
            regexes = []
            for pattern in patterns:
                try:
                    regexes.append(re.compile(pattern))
                except re.error as err:
                    raise ValueError(
                        f"SmoothOutConfig.{name} holds an invalid regular expression {pattern!r}: {err}."
                    ) from err
            compiled[name] = tuple(regexes)
        put("_compiled", compiled)

    @property
    def enabled(self) -> bool:
        """Whether any noise is ever drawn (``strength > 0``)."""
        return self.strength > 0.0

    def selects_name(self, name: str) -> bool:
        """Apply ``include``/``exclude``/``skip_bias`` to a parameter name.

        Example:
            >>> SmoothOutConfig(exclude=["classifier"]).selects_name("classifier.weight")
            False
        """
        if self.skip_bias and (name == "bias" or name.endswith(".bias")):
            return False
        include = self._compiled.get("include")
        if include is not None and not any(p.search(name) for p in include):
            return False
        exclude = self._compiled.get("exclude", ())
        return not any(p.search(name) for p in exclude)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict view (for logs, model cards and JSON)."""
        data = asdict(self)
        data.pop("_compiled", None)
        for name in ("include", "exclude"):
            if data[name] is not None:
                data[name] = list(data[name])
        return data

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of the user-facing fields, in declaration order."""
        return [f.name for f in fields(cls) if f.init]
