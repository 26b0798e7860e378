"""The trainable parameters a measurement works on, and a flat float64 view of them.

The parameters are those SmoothOut would see with every filter off: every trainable tensor
once (tied weights de-duplicated), in module order, each with its output (row/filter) axis from
:func:`hf_smoothout.selection.output_axis` and a flag telling whether it belongs to a
normalization layer.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    >>> vector = ParameterVector(model)
    >>> [(e.name, e.row_axis, e.in_norm_layer) for e in vector.entries]
    [('0.weight', 0, False), ('0.bias', 0, False), ('1.weight', 0, True), ('1.bias', 0, True)]
    >>> flat = vector.get()
    >>> flat.dtype, flat.numel()
    (torch.float64, 12)
    >>> vector.set_(torch.zeros(12)); float(model[0].weight.detach().abs().sum())
    0.0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import SmoothOutConfig
from ..selection import select_parameters


@dataclass(frozen=True)
class AnalysisParameter:
    """One trainable parameter: its name, tensor, output axis and whether a normalization layer owns it."""

    name: str
    param: nn.Parameter
    row_axis: int
    in_norm_layer: bool


def trainable_parameters(model: nn.Module) -> list[AnalysisParameter]:
    """Every trainable parameter of ``model`` once, in module order.

    Raises ``ValueError`` when the model has none (everything frozen).
    """
    everything = select_parameters(model, SmoothOutConfig(skip_norm_layers=False))
    outside_norm = {id(s.param) for s in select_parameters(model, SmoothOutConfig(skip_norm_layers=True))}
    entries = [AnalysisParameter(s.name, s.param, s.row_axis, id(s.param) not in outside_norm) for s in everything]
    if not entries:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (every parameter has requires_grad=False); "
            "sharpness and loss landscapes are measured over the trainable parameters."
        )
    return entries


class ParameterVector:
    """The trainable parameters of a model seen as one flat vector (read and written in float64)."""

    def __init__(self, model: nn.Module) -> None:
        self.entries = trainable_parameters(model)
        self.params = [e.param for e in self.entries]
        self.numels = [p.numel() for p in self.params]
        self.numel = sum(self.numels)

    def get(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The current values as one flat CPU tensor of ``dtype``."""
        return torch.cat([p.detach().reshape(-1).to(device="cpu", dtype=dtype) for p in self.params])

    def set_(self, flat: torch.Tensor) -> None:
        """Overwrite the parameters with ``flat`` (any dtype/device; cast to each parameter's dtype)."""
        if flat.numel() != self.numel:
            raise ValueError(f"Expected a vector of {self.numel} values, got {flat.numel()}.")
        with torch.no_grad():
            for p, chunk in zip(self.params, torch.split(flat.reshape(-1), self.numels), strict=True):
                p.copy_(chunk.view(p.shape))

    def flatten(self, tensors: list[torch.Tensor], dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Concatenate per-parameter tensors (same shapes as the parameters) into one flat CPU tensor."""
        return torch.cat([t.reshape(-1).to(device="cpu", dtype=dtype) for t in tensors])

    def split(self, flat: torch.Tensor, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """Cut a flat vector into per-parameter tensors on each parameter's device (``dtype`` default: float64)."""
        dtype = dtype or torch.float64
        return [
            chunk.view(p.shape).to(device=p.device, dtype=dtype)
            for p, chunk in zip(self.params, torch.split(flat.reshape(-1), self.numels), strict=True)
        ]
