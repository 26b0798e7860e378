"""Sharded (DTensor) parameters, as FSDP2 (``fully_shard``, transformers' ``DistributedConfig``) makes them.

SmoothOut perturbs and restores every rank's *local shard* in place; FSDP2 all-gathers the noisy shards
in the forward pass, so all ranks see one global noise sample per micro-batch. Per-row noise scaling
(``adapt="filter"``) needs whole rows locally: true for a parameter sharded along its row axis (FSDP2's
``Shard(0)`` of ``nn.Linear``/``nn.Embedding``/``nn.Conv*d`` weights) or replicated, and for 1-D
parameters (one element per row). Where rows are split across ranks (GPT-2's ``Conv1D`` stores
``[in, out]`` and FSDP2 shards dim 0, so each output column is spread over the ranks), the partial
squared row norms of the weight and of the draw are all-reduced over the mesh dimensions that split
them (`row_split_groups`), which makes the per-row law exact on the gathered tensor. Element-wise laws
(``none``, ``weight``) work for any sharding. For FSDP2's layout (dim 0 sharded over a 1-D mesh) the noise
is drawn in blocks of global rows seeded without the rank (`dim0_shard_span`), so it does not depend on
the shard count.

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


def dim0_shard_span(param: torch.Tensor) -> tuple[int, int, int] | None:
    """``(global rows of dim 0, first global row held here, rows held here)`` for a DTensor sharded on dim 0 over
    a 1-D mesh (FSDP2's layout), else ``None``.

    With it the engine draws the noise of global row blocks from seeds that do not involve the rank, so the
    gathered noise is the same whatever the shard count (`hf_smoothout.seeding.draw_row_blocks_`).
    """
    if not is_dtensor(param) or param.ndim == 0:
        return None
    placements = param.placements
    if len(placements) != 1 or not placements[0].is_shard() or placements[0].dim % param.ndim != 0:
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, placements)
    return int(param.shape[0]), int(offset[0]), int(local_shape[0])


def fsdp_modules(model: Any) -> list[Any]:
    """The FSDP2 (``fully_shard``) modules of ``model``, outermost first; empty without FSDP2.

    Example:
        >>> fsdp_modules(torch.nn.Linear(2, 2))
        []
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed support
        return []
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def reshard_(modules: list[Any]) -> None:
    """Point every FSDP2 module back at its sharded parameters (a no-op for modules already sharded).

    A forward pass without a backward pass (evaluation, a clean-loss check) leaves the modules that do not
    reshard after forward (accelerate's root and tail, transformers' root) holding *unsharded* parameters.
    SmoothOut perturbs the shards, so it reshards first: the next forward then gathers the noisy shards.
    """
    for module in modules:
        module.reshard()
