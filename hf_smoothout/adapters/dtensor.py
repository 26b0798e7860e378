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


def _fsdp_params(model: Any) -> list[Any]:
    """Every FSDP2 ``FSDPParam`` of ``model`` once (torch's private per-parameter records; empty without FSDP2)."""
    found: dict[int, Any] = {}
    for module in fsdp_modules(model):
        state = module._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # torch releases with one group per module
            groups = [g] if (g := getattr(state, "_fsdp_param_group", None)) is not None else []
        for group in groups:
            for fsdp_param in group.fsdp_params:
                found.setdefault(id(fsdp_param), fsdp_param)
    return list(found.values())


def _holders(fsdp_param: Any) -> list[tuple[Any, str]]:
    """The ``(module, attribute name)`` pairs an ``FSDPParam`` writes its parameter to."""
    info = fsdp_param._module_info
    return [(info.module, info.param_name), *zip(info.shared_modules, info.shared_param_names, strict=True)]


def _uneven_shard_count(fsdp_param: Any, param: torch.Tensor) -> int | None:
    """The shard count when FSDP2 pads this parameter's shards (its size along the sharded dim is not a multiple of
    it), else ``None``. The same answer on every rank: it depends on global sizes only."""
    size = getattr(fsdp_param, "_orig_size", None)
    placement = getattr(fsdp_param, "fsdp_placement", None)
    shards = getattr(getattr(fsdp_param, "mesh_info", None), "shard_mesh_size", None)
    if size is None or placement is None or shards is None:  # other torch releases: the DTensor's dim-0 sharding
        size, dim, shards = tuple(param.shape), 0, 1
        for mesh_dim, dim_placement in enumerate(param.placements):
            if dim_placement.is_shard() and param.ndim and dim_placement.dim % param.ndim == 0:
                shards *= param.device_mesh.size(mesh_dim)
    else:
        dim = placement.dim
    return int(shards) if size and int(size[dim]) % int(shards) else None


def check_fsdp_shared_uneven_shards(model: Any, named_params: list[tuple[str, torch.Tensor]]) -> None:
    """Refuse a sharded parameter that several FSDP2 parameter records gather, padded, from separate buffers.

    transformers' ``DistributedConfig`` applies ``fully_shard`` before it ties weights (``lm_head.weight =
    transformer.wte.weight``), so FSDP2 keeps two records (``FSDPParam``) over the one tied DTensor parameter. When
    its dim 0 does not divide by the shard count, FSDP2's lazy init gives the second record a new padded copy of the
    short shard and points the parameter's local tensor there, while the first record keeps all-gathering from its
    old buffer, which nothing writes any more: the forward pass reads stale rows on that rank, plain training
    included, and noise added to ``param.to_local()`` never reaches them. One record per parameter (weights tied
    before sharding, as under accelerate's FSDP plugin) or even shards are fine.

    Call it with the parameters to perturb; a no-op without DTensor parameters or without FSDP2.

    Raises:
        ValueError: naming the parameter, its modules and the shard count, with the ways out.

    Example:
        >>> check_fsdp_shared_uneven_shards(torch.nn.Linear(2, 2), [("weight", torch.zeros(3, 2))])
    """
    wanted = {id(p): name for name, p in named_params if is_dtensor(p)}
    if not wanted:
        return
    records: dict[int, list[Any]] = {}
    for fsdp_param in _fsdp_params(model):
        # the record's own DTensor (after lazy init), or what its modules hold (before it; not while unsharded)
        held = {id(fsdp_param.sharded_param)}
        held |= {id(module._parameters.get(attr)) for module, attr in _holders(fsdp_param)}
        for key in held & wanted.keys():
            records.setdefault(key, []).append(fsdp_param)
    params = {id(p): p for _, p in named_params}
    module_names = {id(module): name for name, module in model.named_modules()}
    for key, found in records.items():
        param = params[key]
        shards = next((n for fp in found if (n := _uneven_shard_count(fp, param)) is not None), None)
        if len(found) < 2 or shards is None:
            continue
        name = wanted[key]
        holders = sorted({module_names.get(id(module), "?") for fp in found for module, _ in _holders(fp)})
        rows = int(param.shape[0])
        raise ValueError(
            f"SmoothOut: {name!r} ({rows} rows on dim 0, sharded over {shards} FSDP2 ranks: not a multiple) is "
            f"gathered by {len(found)} separate FSDP2 parameter records, one per module that holds it "
            f"({', '.join(repr(h) for h in holders)}): its modules were tied after fully_shard, as transformers' "
            "DistributedConfig(fsdp_size=...) does for tied input/output embeddings. FSDP2 then all-gathers one of "
            "them from a padded copy of the short shard that neither the optimizer nor SmoothOut writes, so the "
            "forward pass reads stale rows there (plain FSDP2 training too) and the noise never reaches them. Pad "
            "dim 0 to a multiple of the shard count before sharding (load the model unsharded, call "
            f"model.resize_token_embeddings(model.config.vocab_size, pad_to_multiple_of={shards}), save_pretrained "
            "and load that with distributed_config), untie the weights (tie_word_embeddings=False), or, accepting the "
            f"stale rows as plain FSDP2 training does, leave this weight clean with "
            f"SmoothOutConfig(exclude=[{name!r}]) (--smoothout_exclude {name})."
        )
