"""`SmoothOutTrainer` and `SmoothOutMixin`: SmoothOut around every micro-batch of a Trainer.

``training_step`` draws fresh noise, runs the parent's ``training_step`` (forward + backward at
the perturbed point) and de-noises in ``finally``; the optimizer step, evaluation and
checkpoints only ever see clean weights.

Example:
    >>> from hf_smoothout import SmoothOutTrainer, SmoothOutTrainingArguments
    >>> args = SmoothOutTrainingArguments("out", smoothout_strength=0.01)  # doctest: +SKIP
    >>> trainer = SmoothOutTrainer(model, args, train_dataset=train_ds)    # doctest: +SKIP
    >>> trainer.train()                                                   # doctest: +SKIP

    Any other Trainer subclass:

    >>> from transformers import Seq2SeqTrainer
    >>> class SmoothOutSeq2SeqTrainer(SmoothOutMixin, Seq2SeqTrainer):
    ...     pass
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.utils import logging

from .arguments import SmoothOutTrainingArguments
from .compat import check_trainer_setup, warn_if_below_resolution
from .config import SmoothOutConfig
from .engine import SmoothOut

logger = logging.get_logger(__name__)

STATE_FILE = "smoothout_state_{rank}.pth"
STRENGTH_LOG_KEY = "smoothout_strength"


def resolve_smoothout_config(args: Any, smoothout_config: SmoothOutConfig | None) -> SmoothOutConfig:
    """The config to use: explicit ``smoothout_config``, else the one in ``SmoothOutTrainingArguments``, else
    the defaults; the noise seed falls back to ``args.seed``.

    Raises ``ValueError`` when both name different settings.
    """
    from_args = args.to_smoothout_config() if isinstance(args, SmoothOutTrainingArguments) else None
    if smoothout_config is None:
        config = from_args if from_args is not None else SmoothOutConfig()
    else:
        if not isinstance(smoothout_config, SmoothOutConfig):
            raise TypeError(f"smoothout_config must be a SmoothOutConfig, got {type(smoothout_config).__name__}.")
        config = smoothout_config
        if from_args is not None:
            explicit = dataclasses.replace(config, seed=config.seed if config.seed is not None else args.seed)
            if explicit.to_dict() != from_args.to_dict():
                raise ValueError(
                    "Both smoothout_config and SmoothOutTrainingArguments' smoothout_* fields were given and they "
                    f"differ ({explicit.to_dict()} vs {from_args.to_dict()}). Pass only one of them."
                )
    if config.seed is None:
        config = dataclasses.replace(config, seed=args.seed)
    return config


class SmoothOutMixin:
    """Adds SmoothOut to any `transformers.Trainer` subclass; put it first in the bases.

    Accepts ``smoothout_config=`` as a keyword; otherwise reads ``SmoothOutTrainingArguments``.

    Example:
        >>> from transformers import Seq2SeqTrainer
        >>> class MyTrainer(SmoothOutMixin, Seq2SeqTrainer):
        ...     pass
    """

    def __init__(self, *args: Any, smoothout_config: SmoothOutConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.smoothout_config = resolve_smoothout_config(self.args, smoothout_config)
        check_trainer_setup(self)
        self.smoothout: SmoothOut | None = None
        self._smoothout_pending_state: dict[str, Any] | None = None
        self._smoothout_samples_in_flight = 1
        self._smoothout_loss_scaled = False

    # ------------------------------------------------------------------ engine
    def smoothout_engine(self) -> SmoothOut:
        """The engine bound to the current ``self.model`` (built on first use, rebuilt if the model changes)."""
        if self.smoothout is None or self.smoothout.model is not self.model:
            engine = SmoothOut(
                self.model, self.smoothout_config, rank=self.args.process_index, world_size=self.args.world_size
            )
            if engine.num_parameters == 0 and self.smoothout_config.enabled:
                logger.warning("SmoothOut selected no parameters: check include/exclude and skip_* settings.")
            compute_dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
            params = engine.parameters
            low = {p.dtype for p in params} & {torch.bfloat16, torch.float16}
            dtype = compute_dtype or (min(low, key=str) if low else None)
            if dtype is not None:
                warn_if_below_resolution(self.smoothout_config, params, dtype)
            if self._smoothout_pending_state is not None:
                engine.load_state_dict(self._smoothout_pending_state)
                self._smoothout_pending_state = None
            self.smoothout = engine
        return self.smoothout

    # ------------------------------------------------------------------ the step
    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Forward + backward at ``samples`` fresh noisy copies of the weights; weights clean on return."""
        if not self.smoothout_config.enabled:
            return super().training_step(model, inputs, num_items_in_batch)
        engine = self.smoothout_engine()
        optimizer_train = getattr(self.optimizer, "train", None)
        if callable(optimizer_train):
            optimizer_train()  # schedule-free optimizers rewrite the weights here: do it before perturbing
        samples = self.smoothout_config.samples
        step, total = self.state.global_step, self.state.max_steps
        total_loss: torch.Tensor | None = None
        for _ in range(samples):
            self._smoothout_samples_in_flight = samples
            self._smoothout_loss_scaled = False
            engine.perturb(step, total)
            try:
                loss = super().training_step(model, inputs, num_items_in_batch)
            finally:
                engine.restore()
                self._smoothout_samples_in_flight = 1
            if samples > 1 and not self._smoothout_loss_scaled:
                raise RuntimeError(
                    f"smoothout samples={samples} needs the loss divided by {samples}, which SmoothOutMixin does in "
                    "compute_loss; this trainer's compute_loss does not call super().compute_loss(). Call it, or "
                    "divide the loss by self.smoothout_config.samples yourself during training."
                )
            total_loss = loss if total_loss is None else total_loss + loss
        assert total_loss is not None
        return total_loss

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        """The parent's loss, divided by the number of noisy copies while ``training_step`` runs them."""
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        samples = self._smoothout_samples_in_flight
        if samples == 1:
            return result
        self._smoothout_loss_scaled = True
        if return_outputs:
            loss, outputs = result
            return loss / samples, outputs
        return result / samples

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the effective noise strength of the latest step to training logs (every ``report_to`` sees it)."""
        if "loss" in logs and self.smoothout is not None:
            logs[STRENGTH_LOG_KEY] = self.smoothout.current_strength
        elif "loss" in logs and not self.smoothout_config.enabled:
            logs[STRENGTH_LOG_KEY] = 0.0
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ model card
    def create_model_card(self, **kwargs: Any) -> None:
        """Write the SmoothOut model card (`hf_smoothout.modelcard`) to ``output_dir/README.md``.

        ``push_to_hub`` calls it; keywords as in `Trainer.create_model_card`, plus ``compare_to`` (a baseline run).
        """
        from .modelcard import write_model_card_from_trainer

        write_model_card_from_trainer(self, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self.smoothout is not None:
            path = os.path.join(output_dir, STATE_FILE.format(rank=self.args.process_index))
            torch.save(self.smoothout.state_dict(), path)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is None or not self.smoothout_config.enabled:
            return
        path = os.path.join(checkpoint, STATE_FILE.format(rank=self.args.process_index))
        if not os.path.isfile(path):
            logger.warning(
                f"No SmoothOut noise state at {path}: resuming with a freshly seeded noise generator, so the "
                "noise will differ from an uninterrupted run."
            )
            return
        state = torch.load(path, weights_only=True)
        if self.smoothout is not None and self.smoothout.model is self.model:
            self.smoothout.load_state_dict(state)
        else:
            self._smoothout_pending_state = state


class SmoothOutTrainer(SmoothOutMixin, Trainer):
    """Swap-in for `transformers.Trainer` that trains with SmoothOut.

    Example:
        >>> from hf_smoothout import SmoothOutConfig
        >>> from transformers import TrainingArguments
        >>> trainer = SmoothOutTrainer(model, TrainingArguments("out"),  # doctest: +SKIP
        ...                            train_dataset=ds, smoothout_config=SmoothOutConfig(strength=0.01))
    """
