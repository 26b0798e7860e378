"""Resumable checkpoints for models that transformers shards at load time (FSDP2 through ``DistributedConfig``).

transformers 5.x refuses to checkpoint the optimizer of such models (``Trainer`` asks for
``save_only_model=True``) and cannot load its own full-weight checkpoint back into DTensor parameters, so
a run sharded at load time could not be resumed. `save_sharded_state` writes what a resume needs next to
the Trainer's files, with ``torch.distributed.checkpoint`` (every rank writes its own shards):
the model and optimizer state (``get_state_dict``), the LR scheduler's state, and the Trainer's RNG and
SmoothOut noise files. `load_sharded_state` reads it back into the sharded model and optimizer. The
Trainer glue (`hf_smoothout.trainer`) calls both; nothing here knows the Trainer.

Example:
    >>> has_sharded_state("/nonexistent/checkpoint-10")
    False
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

SHARDED_STATE_DIR = "smoothout_sharded_state"
SCHEDULER_FILE = "scheduler.pt"


def has_sharded_state(checkpoint_dir: str) -> bool:
    """Whether ``checkpoint_dir`` holds a state written by `save_sharded_state`."""
    return os.path.isfile(os.path.join(checkpoint_dir, SHARDED_STATE_DIR, ".metadata"))


def _inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    inner = optimizer
    while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
        inner = inner.optimizer  # accelerate's AcceleratedOptimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"Expected a torch optimizer (or a wrapper of one), got {type(optimizer).__name__}.")
    return inner


def save_sharded_state(model: nn.Module, optimizer: Any, lr_scheduler: Any, checkpoint_dir: str, rank: int) -> None:
    """Write the sharded model + optimizer state (collective: every rank calls it) and the scheduler (rank 0)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, _inner_optimizer(optimizer))
    state = {"model": model_state, "optimizer": optim_state}
    dcp.save(state, checkpoint_id=os.path.join(checkpoint_dir, SHARDED_STATE_DIR))
    if rank == 0 and lr_scheduler is not None:
        path = os.path.join(checkpoint_dir, SHARDED_STATE_DIR, SCHEDULER_FILE)
        torch.save(lr_scheduler.state_dict(), f"{path}.tmp")
        os.replace(f"{path}.tmp", path)


def load_sharded_state(model: nn.Module, optimizer: Any, lr_scheduler: Any, checkpoint_dir: str) -> None:
    """Read a `save_sharded_state` checkpoint into the sharded ``model``, ``optimizer`` and ``lr_scheduler``.

    Collective: every rank calls it. The shard count may differ from the one that saved (DCP reshards).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    inner = _inner_optimizer(optimizer)
    model_state, optim_state = get_state_dict(model, inner)  # initializes an empty optimizer state to load into
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=os.path.join(checkpoint_dir, SHARDED_STATE_DIR))
    set_state_dict(model, inner, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    path = os.path.join(checkpoint_dir, SHARDED_STATE_DIR, SCHEDULER_FILE)
    if lr_scheduler is not None and os.path.isfile(path):
        lr_scheduler.load_state_dict(torch.load(path, weights_only=True))
