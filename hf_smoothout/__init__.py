"""SmoothOut and AdaSmoothOut (Wen et al., arXiv 1805.07898) for PyTorch and the Hugging Face Trainer.

Example:
    >>> from hf_smoothout import SmoothOut, SmoothOutConfig
    >>> from torch import nn
    >>> engine = SmoothOut(nn.Linear(4, 2), SmoothOutConfig(strength=0.01, seed=0))
    >>> with engine.perturbed(step=0):
    ...     pass  # forward + backward here see the noisy weights
"""

from .arguments import SmoothOutArguments, SmoothOutTrainingArguments
from .config import SmoothOutConfig
from .engine import SmoothOut
from .schedules import noise_coefficient
from .search import STRENGTH_SEARCH_RANGES, smoothout_hp_space
from .selection import select_parameters
from .trainer import SmoothOutMixin, SmoothOutTrainer

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
