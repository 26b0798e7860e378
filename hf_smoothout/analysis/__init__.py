"""Sharpness and loss-landscape tools: Keskar epsilon-sharpness, Hessian spectrum, loss landscapes.

Every measurement takes a model (any ``nn.Module`` whose ``forward(**batch)`` returns ``loss`` --
attribute or key -- and, for accuracy, ``logits``, given batches with ``labels``) and a dataloader
of which the first ``max_batches`` batches are used. The loss is their example-weighted mean
loss in eval mode, accumulated in float64; batches go to the model's device. The model is left
bit-identical (weights, buffers, train/eval modes, ``requires_grad``, gradients, global RNG), also
when the loss raises midway.

* :func:`epsilon_sharpness` -- Keskar et al.'s epsilon-sharpness, full space or random subspace.
* :func:`hessian_top_eigenvalue`, :func:`hessian_trace` -- power iteration and Hutchinson.
* :func:`interpolation_landscape`, :func:`random_landscape` -- 1-D/2-D loss landscapes.
* :func:`measure_sharpness` -- any measure by name (``epsilon``, ``epsilon_subspace``,
  ``hessian_top``, ``hessian_trace``), with :class:`SharpnessOptions`.
* :class:`SharpnessCallback` -- a measure at every ``Trainer`` evaluation (``eval_sharpness_<name>``).
* :func:`save_sharpness`, :func:`save_landscape` -- files under ``<output_dir>/analysis/``:
  ``sharpness.json``, ``landscape_<kind>.png``, ``landscape_<kind>.csv``, ``landscape_<kind>.json``
  with ``<kind>`` in ``interpolation``, ``random_1d``, ``random_2d`` (see :mod:`.export`).

The command line ``hf-smoothout sharpness|landscape`` (:mod:`hf_smoothout.cli`) wraps them.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from hf_smoothout.analysis import epsilon_sharpness, hessian_top_eigenvalue
    >>> class Bowl(nn.Module):  # loss = 0.5 * 3 * |w|^2
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    ...     def forward(self, **batch):
    ...         return {"loss": 1.5 * (self.w ** 2).sum()}
    >>> batches = [{"labels": torch.zeros(8)}]
    >>> round(hessian_top_eigenvalue(Bowl(), batches, progress=False).value, 6)
    3.0
    >>> round(epsilon_sharpness(Bowl(), batches, epsilon=1e-2, progress=False).value, 6)  # 100 * 1.5 * 4e-4
    0.06
"""

from . import _dependencies  # noqa: F401  (first: a clear error when scipy or matplotlib is missing)
from .callback import SharpnessCallback
from .data import model_dataloader
from .directions import filter_normalized_direction
from .epsilon import EpsilonSharpness, RandomSubspace, epsilon_sharpness
from .export import (
    ANALYSIS_DIR,
    LANDSCAPE_STEM,
    SHARPNESS_FILE,
    save_landscape,
    save_sharpness,
)
from .hessian import HessianEigenvalue, HessianTrace, hessian_top_eigenvalue, hessian_trace, hessian_vector_product
from .landscape import LandscapeResult, interpolation_landscape, random_landscape
from .measures import MEASURES, SharpnessOptions, measure_sharpness
from .params import ParameterVector, trainable_parameters
from .state import preserved_model

__all__ = [
    "ANALYSIS_DIR",
    "LANDSCAPE_STEM",
    "MEASURES",
    "SHARPNESS_FILE",
    "EpsilonSharpness",
    "HessianEigenvalue",
    "HessianTrace",
    "LandscapeResult",
    "ParameterVector",
    "RandomSubspace",
    "SharpnessCallback",
    "SharpnessOptions",
    "epsilon_sharpness",
    "filter_normalized_direction",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "hessian_vector_product",
    "interpolation_landscape",
    "measure_sharpness",
    "model_dataloader",
    "preserved_model",
    "random_landscape",
    "save_landscape",
    "save_sharpness",
    "trainable_parameters",
]
