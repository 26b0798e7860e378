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

import contextlib
import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from .adapters.dtensor import fsdp_modules, reshard_
from .checkpoint import BAD_STATE_ADVICE, NoiseStateCallback, noise_state_to_resume
from .compat import forward_compute_dtype, warn_if_below_resolution
from .config import SmoothOutConfig
from .engine import SmoothOut
from .loss_check import NoisyLossCheck
from .trainer_settings import (
    check_trainer_settings,
    log_settings_source,
    resolve_smoothout_config,
    smoothout_fields,
    trial_config,
)

logger = logging.get_logger(__name__)

STRENGTH_LOG_KEY = "smoothout_strength"


class SmoothOutMixin:
    """Adds SmoothOut to any `transformers.Trainer` subclass; put it first in the bases.

    Accepts ``smoothout_config=`` as a keyword; otherwise reads the ``smoothout_*`` fields of ``args``
    (`SmoothOutArguments`, combinable with any ``TrainingArguments`` subclass).

    Example:
        >>> from transformers import Seq2SeqTrainer
        >>> class MyTrainer(SmoothOutMixin, Seq2SeqTrainer):
        ...     pass
    """

    def __init__(self, *args: Any, smoothout_config: SmoothOutConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.smoothout_config = resolve_smoothout_config(self.args, smoothout_config)
        log_settings_source(self.args, smoothout_config, self.smoothout_config)
        check_trainer_settings(self, self.smoothout_config)
        self.smoothout: SmoothOut | None = None
        self._smoothout_pending_state: dict[str, Any] | None = None
        self._smoothout_samples_in_flight = 1
        self._smoothout_loss_scaled = False
        self._smoothout_loss_check = NoisyLossCheck()
        self._smoothout_fsdp_modules: list[Any] = []
        # The noise position goes into every checkpoint through a callback (on_save runs on every rank).
        self.add_callback(NoiseStateCallback(self._smoothout_noise_state, lambda: self.args.process_index))
        self._smoothout_armed = False  # training_step runs: compute_loss opens the noise window
        self._smoothout_opened = False
        self._smoothout_loss_inputs: dict[str, Any] | None = None
        self._smoothout_trial_pending = False
        self._smoothout_config_at_init = self.smoothout_config
        self._smoothout_args_at_init = smoothout_fields(self.args)
        # Buffers and plausibility warnings now, not at the first step; except under accelerate's FSDP plugin,
        # which shards the model only inside train (now it may be whole on every rank, or on the meta device).
        if self.smoothout_config.enabled and self.model is not None and not getattr(self, "is_fsdp_enabled", False):
            self.smoothout_engine()

    # ------------------------------------------------------------------ engine
    def smoothout_engine(self) -> SmoothOut:
        """The engine bound to the current ``self.model`` (built on first use, rebuilt if the model changes).

        Also rebuilt when the model's parameter objects were replaced (accelerate's FSDP2 preparation shards
        every weight into a new DTensor parameter inside ``train``); the noise position carries over. FSDP2
        modules are resharded first, so an evaluation pass that left some of them unsharded cannot bind the
        engine to temporary full weights.
        """
        reshard_(self._smoothout_fsdp_modules)
        self._smoothout_apply_trial()
        old = self.smoothout
        if old is None or old.model is not self.model or old.parameters_replaced:
            self._smoothout_fsdp_modules = fsdp_modules(self.model) if self.model is not None else []
            reshard_(self._smoothout_fsdp_modules)
            if old is not None:
                if not old.is_noisy:
                    old.restore()  # a suspended step-mode window: the weights are clean
                if old.is_perturbed:
                    raise RuntimeError(
                        "SmoothOut: the model or its parameters changed while the weights were perturbed; "
                        "restore() must run first."
                    )
                if self._smoothout_pending_state is None:
                    self._smoothout_pending_state = old.state_dict()
                old.detach()
                old.close()
                self.smoothout = None
            engine = SmoothOut(
                self.model, self.smoothout_config, rank=self.args.process_index, world_size=self.args.world_size
            )
            if engine.num_parameters == 0 and self.smoothout_config.enabled:
                logger.warning("SmoothOut selected no parameters: check include/exclude and skip_* settings.")
            compute_dtype = forward_compute_dtype(self)
            params = engine.parameters
            low = {p.dtype for p in params} & {torch.bfloat16, torch.float16}
            dtype = compute_dtype or (min(low, key=str) if low else None)
            if dtype is not None:
                warn_if_below_resolution(self.smoothout_config, params, dtype)
            if self._smoothout_pending_state is not None:
                engine.load_state_dict(self._smoothout_pending_state)
                self._smoothout_pending_state = None
            self.smoothout = engine
        if getattr(self, "is_deepspeed_enabled", False):
            wrapper = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
            if wrapper is not None:  # exists once accelerate has prepared the model (inside train)
                self.smoothout.guard_deepspeed_step(wrapper.engine)
        return self.smoothout

    # ------------------------------------------------------------------ the step
    # The noise window: `training_step` arms it, `compute_loss` opens it (perturb, or resume a step-mode window)
    # right before the loss's forward pass, and `training_step` closes it (restore, or suspend between the
    # micro-batches of a step-mode window) in `finally`. So only the loss's forward and backward passes see noise:
    # `_prepare_inputs` (TRL's GRPO generates and scores completions there), the optimizer's `train()` and
    # everything outside `training_step` (evaluation, checkpoints, callbacks, `load_best_model_at_end`) run at the
    # clean weights, also when the Trainer leaves the micro-batch loop before a window's last micro-batch.
    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Forward + backward at ``samples`` fresh noisy copies of the weights; weights clean on return."""
        self._smoothout_apply_trial()
        if not self.smoothout_config.enabled:
            return super().training_step(model, inputs, num_items_in_batch)
        engine = self.smoothout_engine()
        if self.smoothout_config.noise_every == "step":
            return self._smoothout_window_step(engine, model, inputs, num_items_in_batch)
        samples = self.smoothout_config.samples
        total_loss: torch.Tensor | None = None
        for _ in range(samples):
            self._smoothout_samples_in_flight = samples
            self._smoothout_loss_scaled = False
            loss = self._smoothout_armed_step(engine, model, inputs, num_items_in_batch, last=True)
            if samples > 1 and not self._smoothout_loss_scaled:
                raise RuntimeError(
                    f"smoothout samples={samples} needs the loss divided by {samples}, which SmoothOutMixin does in "
                    "compute_loss; this trainer's compute_loss does not call super().compute_loss(). Call it, or "
                    "divide the loss by self.smoothout_config.samples yourself during training."
                )
            total_loss = loss if total_loss is None else total_loss + loss
        assert total_loss is not None
        return total_loss

    def _smoothout_window_step(
        self, engine: SmoothOut, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None
    ) -> torch.Tensor:
        """``noise_every="step"``: one draw for all micro-batches of an accumulation window.

        The window opens at its first micro-batch's loss and closes after its last one; in between it is suspended
        (`SmoothOut.suspend`: weights clean, the same noise back at the next micro-batch's loss). A window the
        Trainer left before its last micro-batch (an ``IterableDataset`` epoch, a callback stopping training, the
        SIGTERM checkpoint) is closed when the next window starts or ``train`` ends.
        """
        if engine.is_perturbed and engine.window_step != self.state.global_step:
            engine.restore()  # left before its last micro-batch: the optimizer has stepped since
        return self._smoothout_armed_step(
            engine, model, inputs, num_items_in_batch, last=bool(self.accelerator.sync_gradients)
        )

    def _smoothout_armed_step(
        self,
        engine: SmoothOut,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None,
        *,
        last: bool,
    ) -> torch.Tensor:
        """The parent's ``training_step`` with the window armed (opened by `compute_loss`); ``last``: close the window
        afterwards, else suspend it. The non-finite check then runs at the clean weights."""
        self._smoothout_armed = True
        self._smoothout_opened = False
        failed = True
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
            failed = False
        finally:
            self._smoothout_armed = False
            self._smoothout_samples_in_flight = 1
            if last or failed:
                engine.restore()
            else:
                engine.suspend()
        if not self._smoothout_opened:
            raise RuntimeError(
                "SmoothOut: training_step ran without entering self.compute_loss_context_manager() or calling "
                "self.compute_loss, so no noise was applied: SmoothOut opens its noise window there, right before "
                "the loss's forward pass. Compute the loss inside `with self.compute_loss_context_manager():` in "
                "your training_step override (as Trainer.training_step does)."
            )
        prepared, self._smoothout_loss_inputs = self._smoothout_loss_inputs, None
        assert not engine.is_noisy  # the clean loss is recomputed outside the window
        self._smoothout_loss_check(
            loss,
            strength=engine.current_strength,
            every_step=bool(getattr(self.args, "logging_nan_inf_filter", True)),
            clean_loss=None if prepared is None else lambda: self.compute_loss(model, prepared),
            adapt=self.smoothout_config.adapt,
            step=self.state.global_step,
        )
        return loss

    def _smoothout_open_window(self) -> None:
        """Put the noise in (perturb, or resume a suspended step-mode window) once per armed ``training_step``."""
        engine = self.smoothout
        if self._smoothout_opened or engine is None:
            return
        self._smoothout_opened = True
        if engine.is_perturbed:
            engine.resume()
        else:
            engine.perturb(self.state.global_step, self.state.max_steps)

    def compute_loss_context_manager(self) -> Any:
        """The parent's context for the loss computation; inside an armed ``training_step`` entering it opens the
        noise window (so a ``compute_loss`` override that does not call ``super()`` still trains with noise)."""
        inner = super().compute_loss_context_manager()
        if not self._smoothout_armed:
            return inner

        @contextlib.contextmanager
        def open_then_enter() -> Any:
            self._smoothout_open_window()
            with inner:
                yield

        return open_then_enter()

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`, and clean weights when it ends, also by an error between two micro-batches.

        Under ``hyperparameter_search`` (a ``trial``), every trial trains with its own ``smoothout_*`` values from
        a fresh noise position.
        """
        trial = kwargs.get("trial", args[1] if len(args) > 1 else None)
        if trial is not None:
            self._smoothout_start_trial()
        checkpoint = kwargs.get("resume_from_checkpoint", args[0] if args else None)
        if isinstance(checkpoint, bool) and checkpoint:
            checkpoint = get_last_checkpoint(self.args.output_dir)  # None: the Trainer raises its own error
        if isinstance(checkpoint, str | os.PathLike) and os.path.isdir(checkpoint):
            self._smoothout_resume(os.fspath(checkpoint))
        try:
            return super().train(*args, **kwargs)
        finally:
            self._smoothout_armed = False
            if self.smoothout is not None and self.smoothout.is_perturbed:
                self.smoothout.restore()

    def _smoothout_start_trial(self) -> None:
        """The next engine is built from the trial's settings (``hyperparameter_search`` sets them on ``args``
        inside ``train``, before the first step) with no noise position carried over."""
        if self.smoothout is not None:
            self.smoothout.detach()
            self.smoothout.close()
            self.smoothout = None
        self._smoothout_pending_state = None
        self._smoothout_trial_pending = True
        self._smoothout_loss_check.reset()  # the non-finite checks start again for the trial's strengths

    def _smoothout_apply_trial(self) -> None:
        if not self._smoothout_trial_pending:
            return
        self._smoothout_trial_pending = False
        self.smoothout_config = trial_config(self.args, self._smoothout_config_at_init, self._smoothout_args_at_init)
        check_trainer_settings(self, self.smoothout_config)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        """The parent's loss (opening the noise window first when `training_step` armed it), divided by the
        number of noisy copies while ``training_step`` runs them."""
        if self._smoothout_armed:
            self._smoothout_loss_inputs = inputs  # prepared: the non-finite check recomputes the clean loss on them
            self._smoothout_open_window()
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

    # ------------------------------------------------------------------ clean weights outside the window
    def _smoothout_clean(self) -> Any:
        """Clean weights for a consumer outside the loss (evaluation, prediction, saving): the engine suspends an
        open window's noise around it (never needed from the Trainer's own loop: kept as a guarantee)."""
        return self.smoothout.noise_suspended() if self.smoothout is not None else contextlib.nullcontext()

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """`Trainer.evaluate` at the clean weights."""
        with self._smoothout_clean():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.predict` at the clean weights."""
        with self._smoothout_clean():
            return super().predict(*args, **kwargs)

    def save_model(self, *args: Any, **kwargs: Any) -> None:
        """`Trainer.save_model` of the clean weights."""
        with self._smoothout_clean():
            return super().save_model(*args, **kwargs)

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
    def _smoothout_noise_state(self) -> dict[str, Any] | None:
        """What `NoiseStateCallback` saves: the engine's noise position (the window is closed at every save)."""
        if self.smoothout is None:
            return self._smoothout_pending_state  # resumed but not yet built: carry the loaded position on
        return self.smoothout.state_dict()

    def _smoothout_resume(self, checkpoint: str) -> None:
        """Continue the noise sequence saved in ``checkpoint`` (called by `train` before the Trainer resumes)."""
        found = noise_state_to_resume(self, checkpoint, sharded=bool(self._smoothout_fsdp_modules))
        if found is None:
            return
        state, path = found
        if self.smoothout is not None and self.smoothout.model is self.model:
            try:
                self.smoothout.load_state_dict(state)
            except ValueError as err:
                raise ValueError(f"{path}: {err} {BAD_STATE_ADVICE}") from err
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
