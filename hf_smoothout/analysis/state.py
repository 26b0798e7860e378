"""Leave a model exactly as it was found: weights, buffers, modes, ``requires_grad`` flags, gradients and RNG.

Every measurement of :mod:`hf_smoothout.analysis` moves the weights around; it runs inside
:func:`preserved_model`, which snapshots the model first and restores it in ``finally``, so the
model is bit-identical afterwards even when the loss function raises midway.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.1)).train()
    >>> before = model[0].weight.detach().clone()
    >>> with preserved_model(model):
    ...     with torch.no_grad():
    ...         _ = model[0].weight.add_(1.0)
    ...     model.training
    False
    >>> torch.equal(model[0].weight, before), model.training
    (True, True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def _unique(tensors: Iterator[torch.Tensor]) -> list[torch.Tensor]:
    seen: set[int] = set()
    unique = []
    for tensor in tensors:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            unique.append(tensor)
    return unique


def _cuda_devices(tensors: list[torch.Tensor]) -> list[int]:
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


@contextlib.contextmanager
def preserved_model(model: nn.Module, *, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Snapshot ``model`` and restore it on exit, whatever happens inside.

    Restored: every parameter and buffer value (bit-exact, from a copy: +1x model memory), the
    ``training`` flag of every sub-module, every ``requires_grad`` flag, every ``.grad`` attribute
    and torch's global random generators (CPU and the CUDA devices the model lives on), so a
    measurement during training changes neither the weights nor the data order or dropout masks
    that follow. With ``eval_mode`` (default) the model is switched to ``eval()`` inside.
    """
    params = _unique(p for p in model.parameters())
    buffers = _unique(b for b in model.buffers())
    with torch.no_grad():
        param_copies = [p.detach().clone() for p in params]
        buffer_copies = [b.detach().clone() for b in buffers]
    modes = [(module, module.training) for module in model.modules()]
    flags = [(p, p.requires_grad) for p in params]
    grads = [(p, p.grad) for p in params]
    with torch.random.fork_rng(devices=_cuda_devices(params + buffers)):
        try:
            if eval_mode:
                model.eval()
            yield model
        finally:
            with torch.no_grad():
                for tensor, copy in zip(params + buffers, param_copies + buffer_copies, strict=True):
                    tensor.copy_(copy)
            for module, training in modes:
                module.training = training
            for p, flag in flags:
                p.requires_grad_(flag)
            for p, grad in grads:
                p.grad = grad
