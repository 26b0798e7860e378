"""Opt-in: resumable checkpoints for models sharded at load time (transformers' ``DistributedConfig``).

transformers saves a model sharded at load (``from_pretrained(..., distributed_config=DistributedConfig(...))``)
with ``save_only_model=True`` and cannot load a full-weight checkpoint back into the shards, so
``train(resume_from_checkpoint=...)`` cannot continue such a run. `ShardedResumeMixin` adds the sharded model,
optimizer and scheduler state (``torch.distributed.checkpoint``) and the RNG states to every checkpoint and loads
them on resume. It is not SmoothOut's job and needs four private Trainer methods (no public route saves or loads
the optimizer), so it is a piece of its own: put it before the trainer class.

Example:
    >>> from hf_smoothout import SmoothOutTrainer
    >>> class ResumableTrainer(ShardedResumeMixin, SmoothOutTrainer):
    ...     pass
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from .adapters.sharded_checkpoint import SHARDED_STATE_DIR, has_sharded_state, load_sharded_state, save_sharded_state


def sharded_at_load(trainer: Any) -> bool:
    """Whether the trainer's model was sharded when loaded (``DistributedConfig``)."""
    return bool(getattr(trainer, "is_distributed_loading_by_transformers", False))


def check_not_only_sharded(checkpoint: str) -> None:
    """Refuse to resume an unsharded model from a checkpoint whose optimizer and scheduler exist only in its sharded
    state (an FSDP2 run sharded at load, ``save_only_model=True``): the Trainer would restart both silently."""
    from transformers.trainer import OPTIMIZER_NAME

    if has_sharded_state(checkpoint) and not os.path.isfile(os.path.join(checkpoint, OPTIMIZER_NAME)):
        raise ValueError(
            f"{checkpoint} was written by an FSDP2 run sharded at load (DistributedConfig): its optimizer and "
            f"learning-rate schedule exist only in the sharded state ({SHARDED_STATE_DIR}/), and this run's model is "
            "not sharded (one process, or fsdp_size=1), so resuming would silently restart both. Resume with the "
            "model sharded again (from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=N)) under "
            "torchrun, any N > 1), or start from the saved weights with a fresh optimizer: "
            "from_pretrained(checkpoint) without resume_from_checkpoint."
        )


class ShardedResumeMixin:
    """Saves and loads the sharded training state of a model sharded at load time; inert for any other model.

    Private Trainer methods it overrides, each because no public route exists: ``_save_checkpoint`` (no callback
    gets the optimizer before the Trainer skips it under ``save_only_model``), ``_save_rng_state`` (the RNG states
    the Trainer skips then), ``_load_from_checkpoint`` and ``_load_optimizer_and_scheduler`` (the only places that
    load the model and the optimizer on resume).
    """

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)  # type: ignore[misc]
        if not sharded_at_load(self):
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        step = self.state.global_step  # type: ignore[attr-defined]
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{step}")  # type: ignore[attr-defined]
        os.makedirs(folder, exist_ok=True)
        rank = self.args.process_index  # type: ignore[attr-defined]
        save_sharded_state(self.model, self.optimizer, self.lr_scheduler, folder, rank=rank)  # type: ignore[attr-defined]
        if self.args.save_only_model:  # type: ignore[attr-defined]  # the Trainer skipped these; resuming needs them
            self._save_rng_state(folder)  # type: ignore[attr-defined]

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not sharded_at_load(self):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        if not has_sharded_state(resume_from_checkpoint):
            raise ValueError(
                f"{resume_from_checkpoint} has no sharded state ({SHARDED_STATE_DIR}/): the model is sharded at load "
                "time (DistributedConfig), and transformers cannot load its full-weight checkpoint into the shards. "
                "Resume from a checkpoint written with ShardedResumeMixin, or start from the saved "
                "weights with from_pretrained(checkpoint, distributed_config=...) without resume_from_checkpoint."
            )
        # The model is loaded together with the optimizer in _load_optimizer_and_scheduler (it exists by then).

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not sharded_at_load(self):
            return super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
        load_sharded_state(self.model, self.optimizer, self.lr_scheduler, checkpoint)  # type: ignore[attr-defined]
