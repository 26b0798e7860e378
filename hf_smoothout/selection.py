"""Which parameters get noise, and which axis of each one is its output (row/filter) axis.

Rows are output units: ``nn.Linear`` ``[out, in]`` and ``nn.Conv*d`` ``[out, in/g, *k]`` use
axis 0, ``nn.Embedding`` ``[vocab, dim]`` one row per token (axis 0), transformers' ``Conv1D``
(GPT-2, stored ``[in, out]``) and ``nn.ConvTranspose*d`` (``[in, out/g, *k]``) use axis 1.
A 1-D parameter has one element per row.

Example:
    >>> import torch.nn as nn
    >>> from hf_smoothout import SmoothOutConfig
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    >>> [p.name for p in select_parameters(model, SmoothOutConfig())]
    ['0.weight', '0.bias']
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .config import SmoothOutConfig

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


@dataclass(frozen=True)
class SelectedParameter:
    """A parameter chosen for noise, with its name, output axis and the module that owns it as ``local_name``."""

    name: str
    param: nn.Parameter
    row_axis: int
    module: nn.Module | None = field(default=None, repr=False, compare=False)
    local_name: str = ""


def is_normalization_layer(module: nn.Module) -> bool:
    """True for torch's normalization layers and custom ones named like them (``LlamaRMSNorm``, ``T5LayerNorm``)."""
    if isinstance(module, _NORM_TYPES):
        return True
    name = type(module).__name__
    return name.endswith("Norm") or name.endswith("Norm2d") or "LayerNorm" in name or "RMSNorm" in name


def output_axis(module: nn.Module, local_name: str, param: torch.Tensor) -> int:
    """The axis of ``param`` (owned by ``module`` as ``local_name``) that indexes output units."""
    if param.ndim < 2 or local_name != "weight":
        return 0
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return 1
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D stores [in, out]
        return 1
    return 0


def select_parameters(model: nn.Module, config: SmoothOutConfig) -> list[SelectedParameter]:
    """The trainable parameters of ``model`` that ``config`` selects, each once (tied weights de-duplicated)."""
    selected: list[SelectedParameter] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        skip_module = config.skip_norm_layers and is_normalization_layer(module)
        for local_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{local_name}" if module_name else local_name
            if skip_module or not param.requires_grad or param.numel() == 0:
                continue
            if not config.selects_name(name):
                continue
            selected.append(SelectedParameter(name, param, output_axis(module, local_name, param), module, local_name))
    return selected
