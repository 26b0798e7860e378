"""Shared by the multi-process scripts (``ddp_train.py``, ``deepspeed_train.py``): cross-rank facts and shutdown."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch
import torch.distributed as dist


def replica_facts(first_noise: torch.Tensor, params: torch.Tensor) -> dict[str, bool]:
    """Whether ranks drew different noise (``first_noise``: the first noisy minus clean weights) and whether the
    flattened ``params`` are bit-identical across ranks. Collective: every rank must call it."""
    world = dist.get_world_size()
    noises = [torch.empty_like(first_noise) for _ in range(world)]
    dist.all_gather(noises, first_noise.contiguous())
    all_params = [torch.empty_like(params) for _ in range(world)]
    dist.all_gather(all_params, params.contiguous())
    return {  # one process (the GPU checks on one device): nothing to compare across ranks
        "noise_differs_across_ranks": not torch.equal(noises[0], noises[1]) if world > 1 else None,
        "params_identical_across_ranks": all(torch.equal(all_params[0], p) for p in all_params[1:]),
    }


def write_result_and_shut_down(path: str | Path, result: dict) -> None:
    """Rank 0 writes ``result`` as JSON; then a clean gloo shutdown (avoids the DDP destructor hang)."""
    if dist.get_rank() == 0:
        Path(path).write_text(json.dumps(result))
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
