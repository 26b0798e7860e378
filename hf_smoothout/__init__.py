"""SmoothOut and AdaSmoothOut (Wen et al., arXiv 1805.07898) for PyTorch and the Hugging Face Trainer.

``import hf_smoothout`` loads the engine only (torch, numpy); the Trainer integration (`SmoothOutTrainer`,
`SmoothOutMixin`, `SmoothOutArguments`, `SmoothOutTrainingArguments`) imports transformers on first use.

Example:
    >>> from hf_smoothout import SmoothOut, SmoothOutConfig
    >>> from torch import nn
    >>> engine = SmoothOut(nn.Linear(4, 2), SmoothOutConfig(strength=0.01, seed=0))
    >>> with engine.perturbed(step=0):
    ...     pass  # forward + backward here see the noisy weights
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import SmoothOutConfig
from .engine import SmoothOut
from .schedules import noise_coefficient
from .search import STRENGTH_SEARCH_RANGES, smoothout_hp_space
from .selection import select_parameters

_LAZY = {
    "SmoothOutArguments": "arguments",
    "SmoothOutTrainingArguments": "arguments",
    "SmoothOutMixin": "trainer",
    "SmoothOutTrainer": "trainer",
}

__all__ = [
    "STRENGTH_SEARCH_RANGES",
    "SmoothOut",
    "SmoothOutArguments",
    "SmoothOutConfig",
    "SmoothOutMixin",
    "SmoothOutTrainer",
    "SmoothOutTrainingArguments",
    "noise_coefficient",
    "select_parameters",
    "smoothout_hp_space",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """The Trainer integration, imported (with transformers) when first asked for."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
