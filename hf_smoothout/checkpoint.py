"""The noise state in Trainer checkpoints, on public routes: saved by a `TrainerCallback` (``on_save``), read back
by `SmoothOutMixin.train` (``resume_from_checkpoint``).

Each rank writes ``smoothout_state_<rank>.pth`` (the engine's `SmoothOut.state_dict`: seed, draw count, settings)
into the checkpoint folder once the Trainer has written it, atomically (a crash leaves the old file or the new one,
never half of one). On resume each rank reads its own file, or rank 0's when the run has more ranks than the one
that saved (every rank has made the same number of draws, and a rank's noise is a function of seed, rank, stream
and draw, so rank 0's position continues any rank's sequence exactly).

Example:
    >>> STATE_FILE.format(rank=3)
    'smoothout_state_3.pth'
"""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .guards import validate_state
from .sharded_resume import ShardedResumeMixin, check_not_only_sharded, sharded_at_load

logger = logging.get_logger(__name__)

STATE_FILE = "smoothout_state_{rank}.pth"
BAD_STATE_ADVICE = (
    "Resume from an earlier checkpoint, or delete this file to resume with freshly seeded noise (the noise will "
    "then differ from an uninterrupted run)."
)


def write_noise_state(state: dict[str, Any], folder: str, rank: int) -> str:
    """Write ``state`` as ``folder/smoothout_state_<rank>.pth`` atomically; returns the path."""
    path = os.path.join(folder, STATE_FILE.format(rank=rank))
    staging = f"{path}.tmp"
    torch.save(state, staging)
    os.replace(staging, path)  # a crash leaves the old file or the new one, never half of one
    return path


def check_state(state: Any, path: str) -> None:
    """Raise ``ValueError`` naming ``path`` when ``state`` is not a valid SmoothOut noise state."""
    try:
        validate_state(state)
    except ValueError as err:
        raise ValueError(f"{path}: {err} {BAD_STATE_ADVICE}") from err


def read_state_file(path: str) -> dict[str, Any]:
    """Load a ``smoothout_state_<rank>.pth`` file, with an error that names the file when it is unreadable."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # truncated zip, bad pickle, EOF: all mean the same to the user
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise RuntimeError(
            f"The SmoothOut noise state {path} is unreadable ({type(err).__name__}: {reason}); the checkpoint is "
            f"corrupt or truncated. {BAD_STATE_ADVICE}"
        ) from err
    check_state(state, path)
    return state


def read_noise_state(
    checkpoint: str, rank: int, world_size: int, *, sharded: bool, independent_ranks: bool
) -> tuple[dict[str, Any], str] | None:
    """This rank's noise state in ``checkpoint`` and its path (rank 0's when this rank has none), or ``None`` with
    a warning when the checkpoint holds none; warns (on rank 0) when the world size changed, saying what that does
    to the noise."""
    path = os.path.join(checkpoint, STATE_FILE.format(rank=rank))
    rank0_path = os.path.join(checkpoint, STATE_FILE.format(rank=0))
    if not os.path.isfile(path) and os.path.isfile(rank0_path):
        path = rank0_path  # more ranks than when saving: rank 0's position continues this rank's sequence
    if not os.path.isfile(path):
        logger.warning(
            f"No SmoothOut noise state at {path}: resuming with a freshly seeded noise generator, so the "
            "noise will differ from an uninterrupted run."
        )
        return None
    state = read_state_file(path)
    saved_world = state.get("world_size")
    if isinstance(saved_world, int) and saved_world != world_size and rank == 0:
        if sharded:
            message = (
                "Under FSDP2 the noise is one global sample per micro-batch, drawn per block of global rows from "
                "seeds without the rank, so it continues exactly as with the old shard count."
            )
        else:
            message = "Each rank continues its own noise sequence (noise depends on seed, rank and draw count)" + (
                f"; the sequences of ranks {world_size}..{saved_world - 1} end here, so each step now averages "
                f"{world_size} noise sample(s) instead of {saved_world}."
                if world_size < saved_world and independent_ranks
                else "; the new ranks start their own sequences at the saved draw count."
            )
        warnings.warn(
            f"SmoothOut: the checkpoint was written by {saved_world} process(es) and is resumed by {world_size}. "
            + message,
            UserWarning,
            stacklevel=2,
        )
    return state, path


def checkpoint_folder(output_dir: str, global_step: int) -> str | None:
    """The checkpoint folder the Trainer has just written for ``global_step``: ``output_dir/checkpoint-<step>``,
    or, under ``hyperparameter_search``, the newest ``output_dir/<run>/checkpoint-<step>``; ``None`` if none."""
    name = f"{PREFIX_CHECKPOINT_DIR}-{global_step}"
    candidates = [os.path.join(output_dir, name), *glob.glob(os.path.join(glob.escape(output_dir), "*", name))]
    existing = [path for path in candidates if os.path.isdir(path)]
    return max(existing, key=os.path.getmtime) if existing else None


class NoiseStateCallback(TrainerCallback):
    """Writes the engine's noise state into every checkpoint the Trainer saves (``on_save``, on every rank).

    Args:
        state_of: returns the noise state to save, or ``None`` when SmoothOut is off (called at each save).
        rank: returns this process's rank.
    """

    def __init__(self, state_of: Callable[[], dict[str, Any] | None], rank: Callable[[], int]) -> None:
        self._state_of = state_of
        self._rank = rank

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        noise_state = self._state_of()
        if noise_state is None:
            return
        folder = checkpoint_folder(args.output_dir, state.global_step)
        if folder is None:
            logger.warning(
                f"SmoothOut: no checkpoint folder for step {state.global_step} under {args.output_dir}; the noise "
                "state was not saved (a resume from it would draw freshly seeded noise)."
            )
            return
        write_noise_state(noise_state, folder, self._rank())


def noise_state_to_resume(trainer: Any, checkpoint: str, *, sharded: bool) -> tuple[dict[str, Any], str] | None:
    """The noise state a trainer resuming from ``checkpoint`` continues (and the file it came from), or ``None``.

    Refuses first what the Trainer itself could not resume exactly: a model sharded at load without the opt-in
    `hf_smoothout.sharded_resume.ShardedResumeMixin`, or an unsharded model from a checkpoint whose optimizer exists
    only in sharded form. ``sharded``: the model's weights are FSDP2 shards (any rank's file continues the sequence).
    """
    if sharded_at_load(trainer) and not isinstance(trainer, ShardedResumeMixin):
        raise ValueError(
            "SmoothOut: this model was sharded at load time (DistributedConfig), and transformers cannot resume "
            "such a run from its full-weight checkpoint. Add the opt-in ShardedResumeMixin: "
            "class Resumable(ShardedResumeMixin, SmoothOutTrainer): pass (from hf_smoothout.sharded_resume), "
            "and train with it from the start so that its checkpoints hold the sharded state."
        )
    if not sharded_at_load(trainer):
        check_not_only_sharded(checkpoint)
    if not trainer.smoothout_config.enabled:
        return None
    return read_noise_state(
        checkpoint,
        trainer.args.process_index,
        trainer.args.world_size,
        sharded=sharded or sharded_at_load(trainer),
        independent_ranks=trainer.smoothout_config.independent_ranks,
    )
