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
import dataclasses
import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from .adapters.deepspeed import check_deepspeed
from .adapters.dtensor import fsdp_modules, reshard_
from .arguments import SmoothOutArguments
from .checkpoint import BAD_STATE_ADVICE, NoiseStateCallback, read_noise_state
from .compat import check_trainer_setup, warn_if_below_resolution
from .config import SmoothOutConfig
from .engine import NonFiniteNoiseError, SmoothOut
from .guards import check_restore_mode
from .selection import select_parameters
from .sharded_resume import ShardedResumeMixin, check_not_only_sharded, sharded_at_load

logger = logging.get_logger(__name__)

STRENGTH_LOG_KEY = "smoothout_strength"
# Without logging_nan_inf_filter, the loss at the noisy weights is checked for finiteness at the first step and
# whenever the effective strength exceeds this factor times the last checked one.
_LOSS_CHECK_GROWTH = 2.0


def check_selection(model: nn.Module | None, config: SmoothOutConfig) -> None:
    """Raise ``ValueError`` when an enabled ``config`` selects no trainable parameter of ``model``.

    Example:
        >>> from torch import nn
        >>> try:
        ...     check_selection(nn.Linear(2, 2), SmoothOutConfig(include=["decoder"]))
        ... except ValueError as err:
        ...     print(str(err).split(":")[0])
        SmoothOut selects no trainable parameter
    """
    if model is None or not config.enabled or select_parameters(model, config):
        return
    everything = dataclasses.replace(config, skip_norm_layers=False, skip_bias=False, include=None, exclude=None)
    trainable = len(select_parameters(model, everything))
    named = [name for name, _ in model.named_parameters()]
    frozen_matches = [name for name, p in model.named_parameters() if not p.requires_grad and config.selects_name(name)]
    hint = (
        f" Your patterns only match frozen parameters (e.g. {frozen_matches[0]!r}); frozen parameters never get noise."
        if frozen_matches and len(frozen_matches) == len([n for n in named if config.selects_name(n)])
        else ""
    )
    raise ValueError(
        f"SmoothOut selects no trainable parameter: of the model's {len(named)} parameters ({trainable} trainable), "
        f"none passes include={config.include}, exclude={config.exclude}, skip_norm_layers={config.skip_norm_layers}, "
        f"skip_bias={config.skip_bias}.{hint} Fix the selection, or set smoothout strength 0 to train without noise."
    )


def resolve_smoothout_config(args: Any, smoothout_config: SmoothOutConfig | None) -> SmoothOutConfig:
    """The config to use: explicit ``smoothout_config``, else the one in the ``smoothout_*`` fields of ``args``
    (`SmoothOutArguments`: ``SmoothOutTrainingArguments`` or a config class combined with it), else
    the defaults; the noise seed falls back to ``args.seed``.

    Raises ``ValueError`` when both name different settings.
    """
    from_args = args.to_smoothout_config() if isinstance(args, SmoothOutArguments) else None
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
                    "Both smoothout_config and the arguments' smoothout_* fields were given and they "
                    f"differ ({explicit.to_dict()} vs {from_args.to_dict()}). Pass only one of them."
                )
    if config.seed is None:
        config = dataclasses.replace(config, seed=args.seed)
    return config


def log_settings_source(args: Any, explicit: SmoothOutConfig | None, config: SmoothOutConfig) -> str:
    """Say where the SmoothOut settings came from (and warn when an arguments class without ``smoothout_*``
    fields left them at their defaults); returns the message."""
    if explicit is not None:
        message = f"SmoothOut settings from smoothout_config=: {config.to_dict()}"
    elif isinstance(args, SmoothOutArguments):
        message = f"SmoothOut settings from the {type(args).__name__} smoothout_* fields: {config.to_dict()}"
    else:
        message = (
            f"SmoothOut runs at its default settings (strength {config.strength:g}, adapt={config.adapt!r}): "
            f"{type(args).__name__} has no smoothout_* fields and no smoothout_config= was given, so "
            "--smoothout_* flags cannot reach it. Pass smoothout_config=SmoothOutConfig(...), or combine your "
            "arguments class with hf_smoothout.SmoothOutArguments (@dataclass class MyConfig(SmoothOutArguments, "
            f"{type(args).__name__}))."
        )
        logger.warning(message)
        return message
    logger.info(message)
    return message


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
        if self.smoothout_config.enabled:
            check_trainer_setup(self)
            if getattr(self, "is_deepspeed_enabled", False):
                check_deepspeed(self, self.smoothout_config.samples)
                if self.smoothout_config.restore == "swap":
                    raise ValueError(
                        "SmoothOut restore='swap' is not supported with DeepSpeed: its parameters are views into "
                        "DeepSpeed's flat buffers, which pointing them at another tensor would cut. Use "
                        "restore='copy' (bit-exact, restored before DeepSpeed's optimizer step)."
                    )
            check_restore_mode(self.smoothout_config, self.args.world_size)
            check_selection(self.model, self.smoothout_config)
        self.smoothout: SmoothOut | None = None
        self._smoothout_pending_state: dict[str, Any] | None = None
        self._smoothout_samples_in_flight = 1
        self._smoothout_loss_scaled = False
        self._smoothout_loss_checked = 0.0
        self._smoothout_fsdp_modules: list[Any] = []
        # The noise position goes into every checkpoint through a callback (on_save runs on every rank).
        self.add_callback(NoiseStateCallback(self._smoothout_noise_state, lambda: self.args.process_index))
        self._smoothout_armed = False  # training_step runs: compute_loss opens the noise window
        self._smoothout_opened = False
        self._smoothout_loss_inputs: dict[str, Any] | None = None
        self._smoothout_trial_pending = False
        self._smoothout_config_at_init = self.smoothout_config
        self._smoothout_args_at_init = (
            self.args.to_smoothout_config().to_dict() if isinstance(self.args, SmoothOutArguments) else {}
        )
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
            compute_dtype = self._smoothout_compute_dtype()
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

    def _smoothout_compute_dtype(self) -> torch.dtype | None:
        """The autocast dtype the forward really runs in (accelerate ignores fp16 on CPU), else ``None``."""
        accelerator = getattr(self, "accelerator", None)
        mixed = str(getattr(accelerator, "mixed_precision", "no")) if accelerator is not None else "no"
        if mixed == "no" and accelerator is None:
            mixed = "bf16" if self.args.bf16 else "fp16" if self.args.fp16 else "no"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed)
        if dtype is not None and accelerator is not None and not getattr(accelerator, "native_amp", True):
            if not getattr(self, "_smoothout_told_no_amp", False):
                logger.warning(
                    f"mixed precision {mixed!r} is not active on {self.args.device.type} (accelerate runs the forward "
                    "in the parameters' dtype there), so SmoothOut's noise is not rounded to it."
                )
                self._smoothout_told_no_amp = True
            return None
        return dtype

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
        self._smoothout_check_loss(model, prepared, loss, engine.current_strength)
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
        self._smoothout_loss_checked = 0.0  # the non-finite checks start again for the trial's strengths
        self._smoothout_told_diverged = False

    def _smoothout_apply_trial(self) -> None:
        if not self._smoothout_trial_pending:
            return
        self._smoothout_trial_pending = False
        self.smoothout_config = self._smoothout_trial_config()
        if self.smoothout_config.enabled:
            check_trainer_setup(self)
            check_restore_mode(self.smoothout_config, self.args.world_size)
            check_selection(self.model, self.smoothout_config)

    def _smoothout_trial_config(self) -> SmoothOutConfig:
        """``smoothout_config`` with the ``smoothout_*`` values the trial changed on ``args`` since construction."""
        if not isinstance(self.args, SmoothOutArguments):
            return self.smoothout_config
        now = self.args.to_smoothout_config().to_dict()
        changed = {k: v for k, v in now.items() if self._smoothout_args_at_init.get(k) != v}
        config = dataclasses.replace(self._smoothout_config_at_init, **changed)
        if changed:
            logger.info(f"SmoothOut: this trial trains with {changed}.")
        return config

    def _smoothout_check_loss(
        self, model: nn.Module, inputs: dict[str, Any] | None, loss: torch.Tensor, strength: float
    ) -> None:
        """Refuse a non-finite loss at the noisy weights when the loss at the clean weights is finite.

        Checked every micro-batch when ``logging_nan_inf_filter`` is on (the Trainer reads the loss on the
        host then anyway, so this adds no synchronization), else at each new peak strength. The clean loss
        is only computed (one extra forward, no gradient, at the clean weights: the window is closed or
        suspended by then) when the noisy one is not finite.
        """
        every_step = bool(getattr(self.args, "logging_nan_inf_filter", True))
        if not every_step and strength <= _LOSS_CHECK_GROWTH * self._smoothout_loss_checked:
            return
        if bool(torch.isfinite(loss.detach()).all()):
            self._smoothout_loss_checked = max(self._smoothout_loss_checked, strength)
            return
        if inputs is None:
            return
        assert self.smoothout is None or not self.smoothout.is_noisy
        with torch.no_grad():
            clean = self.compute_loss(model, inputs)
        if bool(torch.isfinite(clean.detach()).all()):
            raise NonFiniteNoiseError(
                f"SmoothOut: the loss at the noisy weights is {loss.item()} while the clean loss is {clean.item():.4g} "
                f"(strength {strength:g}, adapt={self.smoothout_config.adapt!r}): the noise is far too strong for this "
                "model. Lower smoothout strength (typical: 1e-3 to 5e-2 with adapt='filter'). The weights are clean."
            )
        if not getattr(self, "_smoothout_told_diverged", False):
            self._smoothout_told_diverged = True
            logger.warning(
                f"The loss is non-finite at the clean weights too (step {self.state.global_step}): training has "
                "diverged, and the Trainer's logging_nan_inf_filter keeps it out of the logged loss. If it began "
                "with SmoothOut, lower smoothout strength."
            )

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
        if sharded_at_load(self) and not isinstance(self, ShardedResumeMixin):
            raise ValueError(
                "SmoothOut: this model was sharded at load time (DistributedConfig), and transformers cannot resume "
                "such a run from its full-weight checkpoint. Add the opt-in ShardedResumeMixin: "
                "class Resumable(ShardedResumeMixin, SmoothOutTrainer): pass (from hf_smoothout.sharded_resume), "
                "and train with it from the start so that its checkpoints hold the sharded state."
            )
        if not sharded_at_load(self):
            check_not_only_sharded(checkpoint)
        if not self.smoothout_config.enabled:
            return
        found = read_noise_state(
            checkpoint,
            self.args.process_index,
            self.args.world_size,
            sharded=bool(self._smoothout_fsdp_modules) or sharded_at_load(self),
            independent_ranks=self.smoothout_config.independent_ranks,
        )
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
