"""Validated configuration of the SmoothOut method.

Example:
    >>> from hf_smoothout import SmoothOutConfig
    >>> cfg = SmoothOutConfig(strength=0.01, adapt="filter", schedule="anneal")
    >>> cfg.samples
    1
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

ADAPT_MODES = ("filter", "none", "weight")
DISTRIBUTIONS = ("uniform", "gaussian")
SCHEDULES = ("constant", "anneal", "tanh")
RESTORE_MODES = ("copy", "regenerate")

Adapt = Literal["filter", "none", "weight"]
Distribution = Literal["uniform", "gaussian"]
Schedule = Literal["constant", "anneal", "tanh"]
Restore = Literal["copy", "regenerate"]


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"SmoothOutConfig.{name}={value!r} is not valid; allowed values: {', '.join(allowed)}.")


@dataclass
class SmoothOutConfig:
    """Every knob of SmoothOut / AdaSmoothOut (Wen et al., arXiv 1805.07898).

    Attributes:
        strength: the noise strength ``a``. With ``adapt="filter"`` each row's noise vector has
            L2 norm ``a * ||w_row||``; with ``"none"`` the noise is ``U(-a, a)`` (or ``a * N(0, 1)``);
            with ``"weight"`` it is ``a * w * U(-1, 1)`` element-wise. ``0`` disables the method.
        adapt: noise scaling: ``"filter"`` (AdaSmoothOut, per output row/filter), ``"none"``
            (plain SmoothOut box) or ``"weight"`` (element-wise, relative to each weight).
        distribution: ``"uniform"`` (the paper's choice) or ``"gaussian"``.
        schedule: multiplier of ``strength`` over training: ``"constant"``, ``"anneal"``
            (``(1 + t) ** (-anneal_index / 2)``) or ``"tanh"`` (ramps up, ``tanh_scale`` steepness).
        anneal_index: exponent of the ``"anneal"`` schedule.
        tanh_scale: steepness of the ``"tanh"`` schedule.
        samples: K noisy copies per micro-batch; their gradients are averaged.
        denoise: remove the noise after the backward pass (the method). ``False`` leaves the
            noise in the weights (classic weight-noise injection, for ablations only).
        restore: ``"copy"`` restores bit-exactly from a preallocated backup (one extra copy of
            the selected parameters); ``"regenerate"`` keeps no backup and regenerates the noise
            from the saved generator state to remove it: **not bit-exact** (rounding drift of a
            few ulps per step) and refused when ranks draw different noise.
        skip_norm_layers: leave parameters of normalization layers (BatchNorm, LayerNorm,
            GroupNorm, RMSNorm, ...) untouched.
        skip_bias: leave parameters named ``*bias`` untouched.
        include: if given, only parameters whose name matches one of these regular expressions
            (``re.search``) are perturbed.
        exclude: parameters whose name matches one of these regular expressions are skipped.
        seed: seed of the noise generator; ``None`` derives it from torch's initial seed (the
            Trainer passes ``TrainingArguments.seed``).
        independent_ranks: each distributed rank draws different noise (seed offset by rank),
            so data-parallel training averages ``world_size`` noise samples per step.

    Example:
        >>> SmoothOutConfig(strength=0.005, adapt="none", samples=2).to_dict()["samples"]
        2
    """

    strength: float = 0.01
    adapt: Adapt = "filter"
    distribution: Distribution = "uniform"
    schedule: Schedule = "constant"
    anneal_index: float = 0.55
    tanh_scale: float = 10.0
    samples: int = 1
    denoise: bool = True
    restore: Restore = "copy"
    skip_norm_layers: bool = True
    skip_bias: bool = False
    include: list[str] | None = None
    exclude: list[str] | None = None
    seed: int | None = None
    independent_ranks: bool = True
    _compiled: dict[str, list[re.Pattern[str]]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)):
            raise ValueError(f"SmoothOutConfig.strength must be a number, got {self.strength!r}.")
        self.strength = float(self.strength)
        if not (self.strength >= 0.0) or self.strength == float("inf"):
            raise ValueError(
                f"SmoothOutConfig.strength={self.strength!r} is not valid; it must be a finite number >= 0 "
                "(0 disables SmoothOut; typical values are 1e-3 to 5e-2 with adapt='filter')."
            )
        _check_choice("adapt", self.adapt, ADAPT_MODES)
        _check_choice("distribution", self.distribution, DISTRIBUTIONS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("restore", self.restore, RESTORE_MODES)
        if not (self.anneal_index > 0.0):
            raise ValueError(f"SmoothOutConfig.anneal_index={self.anneal_index!r} is not valid; it must be > 0.")
        if not (self.tanh_scale > 0.0):
            raise ValueError(f"SmoothOutConfig.tanh_scale={self.tanh_scale!r} is not valid; it must be > 0.")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"SmoothOutConfig.samples={self.samples!r} is not valid; it must be an integer >= 1.")
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
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"SmoothOutConfig.seed={self.seed!r} is not valid; it must be None or an integer >= 0.")
        for name in ("include", "exclude"):
            patterns = getattr(self, name)
            if patterns is None:
                continue
            if isinstance(patterns, str):
                patterns = [patterns]
            patterns = list(patterns)
            setattr(self, name, patterns)
            compiled = []
            for pattern in patterns:
                try:
                    compiled.append(re.compile(pattern))
                except re.error as err:
                    raise ValueError(
                        f"SmoothOutConfig.{name} holds an invalid regular expression {pattern!r}: {err}."
                    ) from err
            self._compiled[name] = compiled

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
        exclude = self._compiled.get("exclude", [])
        return not any(p.search(name) for p in exclude)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict view (for logs, model cards and JSON)."""
        data = asdict(self)
        data.pop("_compiled", None)
        return data

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of the user-facing fields, in declaration order."""
        return [f.name for f in fields(cls) if f.init]
