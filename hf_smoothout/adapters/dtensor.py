"""Sharded (DTensor) parameters, as FSDP2 (``fully_shard``, transformers' ``DistributedConfig``) makes them.

SmoothOut perturbs and restores every rank's *local shard* in place; FSDP2 all-gathers the noisy shards
in the forward pass, so all ranks see one global noise sample per micro-batch. Per-row noise scaling
(``adapt="filter"``) needs whole rows locally: true for a parameter sharded along its row axis (FSDP2's
``Shard(0)`` of ``nn.Linear``/``nn.Embedding``/``nn.Conv*d`` weights) or replicated, and for 1-D
parameters (one element per row). Where rows are split across ranks (GPT-2's ``Conv1D`` stores
``[in, out]`` and FSDP2 shards dim 0, so each output column is spread over the ranks), the partial
squared row norms of the weight and of the draw are all-reduced over the mesh dimensions that split
them (`row_split_groups`), which makes the per-row law exact on the gathered tensor. Element-wise laws
(``none``, ``weight``) work for any sharding.

Example:
    >>> import torch
    >>> is_dtensor(torch.zeros(2)), local_tensor(torch.zeros(2)).shape
    (False, torch.Size([2]))
"""

from __future__ import annotations

from typing import Any

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


def row_split_groups(param: torch.Tensor, row_axis: int) -> tuple[Any, ...]:
    """Process groups over which ``param``'s output rows are split (empty when rows are local).

    Raises:
        ValueError: for placements other than ``Shard``/``Replicate`` (e.g. ``Partial``).
    """
    if not is_dtensor(param) or param.ndim <= 1:
        return ()
    groups = []
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_replicate():
            continue
        if not placement.is_shard():
            raise ValueError(f"SmoothOut cannot perturb a DTensor with placement {placement} (only Shard/Replicate).")
        if placement.dim % param.ndim != row_axis:
            groups.append(param.device_mesh.get_group(mesh_dim))
    return tuple(groups)
