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


def logical_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The shape of the weight ``param`` stands for: DeepSpeed ZeRO-3 keeps an empty placeholder between forward
    passes and the true shape in ``ds_shape``.

    Example:
        >>> logical_shape(torch.zeros(3, 4))
        (3, 4)
    """
    shape = getattr(param, "ds_shape", None)
    return tuple(int(s) for s in (shape if shape is not None else param.shape))


def output_axis(module: nn.Module, local_name: str, param: torch.Tensor) -> int:
    """The axis of ``param`` (owned by ``module`` as ``local_name``) that indexes output units."""
    if len(logical_shape(param)) < 2 or local_name != "weight":
        return 0
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return 1
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D stores [in, out]
        return 1
    return 0


def is_plain_tensor(tensor: torch.Tensor) -> bool:
    """A ``torch.Tensor`` or ``nn.Parameter`` itself, not a subclass (DTensor, quantized weights) whose storage
    says more (or less) than its values."""
    return type(tensor) in (nn.Parameter, torch.Tensor)


def _memory(param: torch.Tensor) -> tuple[tuple[str, int], tuple[int, int], tuple[object, ...]] | None:
    """Where ``param``'s values live: (device and storage address, element range, exact view), or ``None`` when it
    has no real storage to compare (meta tensors, tensor subclasses such as DTensor)."""
    if not is_plain_tensor(param) or param.device.type == "meta":
        return None
    data = param.data
    address = data.untyped_storage().data_ptr()
    if address == 0:
        return None
    offset = data.storage_offset()
    extent = 1 + sum((size - 1) * abs(step) for size, step in zip(data.shape, data.stride(), strict=True))
    view = (offset, tuple(data.shape), data.stride(), data.dtype)
    return (str(data.device), address), (offset, offset + extent), view


def select_parameters(model: nn.Module, config: SmoothOutConfig) -> list[SelectedParameter]:
    """The trainable parameters of ``model`` that ``config`` selects, each once (tied weights de-duplicated).

    Two ``Parameter`` objects over the same memory (a tied checkpoint loaded with ``assign=True``) are tied
    weights too: the first one is kept, since noise written into one is the other's. Two that overlap only in
    part are refused with an error (their noise would be added twice where they overlap).
    """
    selected: list[SelectedParameter] = []
    seen: set[int] = set()
    memory: dict[tuple[str, int], list[tuple[tuple[int, int], tuple[object, ...], str]]] = {}
    for module_name, module in model.named_modules():
        skip_module = config.skip_norm_layers and is_normalization_layer(module)
        for local_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{local_name}" if module_name else local_name
            numel = int(getattr(param, "ds_numel", param.numel()))  # ZeRO-3: the partitioned weight's size
            if skip_module or not param.requires_grad or numel == 0:
                continue
            if not config.selects_name(name):
                continue
            where = _memory(param)
            if where is not None:
                storage, span, view = where
                others = memory.setdefault(storage, [])
                if any(other_view == view for _, other_view, _ in others):
                    continue  # the same memory as a parameter already selected: tied
                for other_span, _, other_name in others:
                    if span[0] < other_span[1] and other_span[0] < span[1]:
                        raise ValueError(
                            f"SmoothOut: parameters {other_name!r} and {name!r} overlap in memory without being the "
                            "same view of it, so noise would be added twice where they overlap. Give them separate "
                            "storage, or leave one out with SmoothOutConfig(exclude=[...])."
                        )
                others.append((span, view, name))
            selected.append(SelectedParameter(name, param, output_axis(module, local_name, param), module, local_name))
    return selected
