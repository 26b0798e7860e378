"""Strength search spaces for ``Trainer.hyperparameter_search`` (optuna): the question every user asks first.

`smoothout_hp_space` returns an ``hp_space`` function that suggests ``smoothout_strength`` log-uniformly over the
range our studies searched for the given ``adapt`` law (`STRENGTH_SEARCH_RANGES`), and fixes ``smoothout_adapt`` to
that law. Each trial of `SmoothOutTrainer.hyperparameter_search` then trains with its own values from a fresh noise
position. Needs ``SmoothOutTrainingArguments`` (the ``smoothout_*`` fields the trial sets).

Example:
    >>> space = smoothout_hp_space("filter")
    >>> class FixedTrial:  # what optuna passes in; here a stand-in that always suggests the low end
    ...     def suggest_float(self, name, low, high, log=False):
    ...         return low
    >>> space(FixedTrial())
    {'smoothout_strength': 0.003, 'smoothout_adapt': 'filter'}
    >>> # trainer.hyperparameter_search(hp_space=smoothout_hp_space("filter"), backend="optuna", n_trials=8)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

STRENGTH_SEARCH_RANGES: dict[str, tuple[float, float]] = {
    "filter": (3e-3, 1.0),
    "filter_std": (3e-3, 1.0),
    "weight": (3e-3, 1.0),
    "none": (1e-4, 3e-2),
}
"""Log-uniform strength ranges per ``adapt`` law. Our studies searched inside them and chose (README, "Choosing the
strength"): ``filter`` 0.0033-0.3 (LoRA merged space 0.0033-0.03, LoRA adapters 0.01-0.1, full fine-tuning
0.01-0.3), ``none`` 2.5e-4-0.01. ``filter_std`` and ``weight`` are relative to the weights like ``filter``."""


def smoothout_hp_space(
    adapt: str = "filter",
    *,
    low: float | None = None,
    high: float | None = None,
    extra: Callable[[Any], dict[str, Any]] | None = None,
) -> Callable[[Any], dict[str, Any]]:
    """An optuna ``hp_space`` for ``hyperparameter_search``: ``smoothout_strength`` log-uniform in ``[low, high]``
    (default: `STRENGTH_SEARCH_RANGES` of ``adapt``) and ``smoothout_adapt=adapt``; ``extra(trial)`` adds more
    values (a learning rate, say).

    Raises ``ValueError`` for an unknown ``adapt`` or a range that is not ``0 < low < high``.
    """
    if adapt not in STRENGTH_SEARCH_RANGES:
        raise ValueError(f"Unknown adapt {adapt!r}; expected one of {sorted(STRENGTH_SEARCH_RANGES)}.")
    default_low, default_high = STRENGTH_SEARCH_RANGES[adapt]
    lo = default_low if low is None else float(low)
    hi = default_high if high is None else float(high)
    if not 0.0 < lo < hi:
        raise ValueError(f"The strength range must satisfy 0 < low < high (log-uniform), got [{lo}, {hi}].")

    def hp_space(trial: Any) -> dict[str, Any]:
        values: dict[str, Any] = {
            "smoothout_strength": trial.suggest_float("smoothout_strength", lo, hi, log=True),
            "smoothout_adapt": adapt,
        }
        if extra is not None:
            values.update(extra(trial))
        return values

    return hp_space
