"""Sharded (DTensor) parameters, as FSDP2 (``fully_shard``, transformers' ``DistributedConfig``) makes them.

SmoothOut perturbs and restores every rank's *local shard* in place; FSDP2 all-gathers the noisy shards
in the forward pass, so all ranks see one global noise sample per micro-batch. Per-row noise scaling
(``adapt="filter"``) needs whole rows locally: true for a parameter sharded along its row axis (FSDP2's
``Shard(0)`` of ``nn.Linear``/``nn.Embedding``/``nn.Conv*d`` weights) or replicated, and for 1-D
parameters (one element per row). Element-wise laws (``none``, ``weight``) work for any sharding.

Example:
    >>> import torch
    >>> is_dtensor(torch.zeros(2)), local_tensor(torch.zeros(2)).shape
    (False, torch.Size([2]))
"""

from __future__ import annotations

import torch


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` (or its ``.data``) is a ``torch.distributed.tensor.DTensor``."""
    return type(tensor).__name__ == "DTensor" or type(getattr(tensor, "data", None)).__name__ == "DTensor"


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage holds this rank's values: the local shard of a DTensor, else ``param.data``."""
    if is_dtensor(param):
        with torch.no_grad():
            return param.detach().to_local()
    return param.data


def rows_are_local(param: torch.Tensor, row_axis: int) -> bool:
    """Whether every output row of ``param`` lies whole in this rank's shard (replicated, or sharded along rows)."""
    if not is_dtensor(param) or param.ndim <= 1:
        return True
    for placement in param.placements:
        if placement.is_replicate():
            continue
        if placement.is_shard() and placement.dim % param.ndim == row_axis:
            continue
        return False
    return True
