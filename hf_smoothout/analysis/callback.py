"""`SharpnessCallback`: a sharpness measure at every evaluation of a `transformers.Trainer`.

At ``on_evaluate`` the callback computes each chosen measure (:data:`.measures.MEASURES`) of the
clean model on a bounded number of batches and adds ``<prefix>_sharpness_<measure>`` (e.g.
``eval_sharpness_epsilon``; ``<prefix>`` is the evaluation's metric prefix, ``eval`` by default),
``<prefix>_sharpness_<measure>_std`` where there is a spread (epsilon with ``repeats > 1``, the
Hutchinson trace) and ``<prefix>_sharpness_runtime`` (seconds) to

* the metrics dict that ``Trainer.evaluate`` returns (so ``metric_for_best_model`` and callbacks
  after this one see them),
* ``trainer.state.log_history`` (merged into the evaluation's entry, hence ``trainer_state.json``).

``Trainer`` logs the evaluation metrics *before* calling ``on_evaluate``; to also send the values
through ``Trainer.log`` (so ``report_to`` integrations receive them, as a separate log entry), add
the callback with :meth:`SharpnessCallback.attach` instead of ``callbacks=[...]``.

The model is left bit-identical, in its mode, and torch's random generators are restored, so a run
with the callback trains exactly like one without. Under distributed training every rank measures its
own (unwrapped) copy of the model on its own data, with no communication; the values are per rank.

Data: ``dataloader``, else ``dataset`` (batched like the Trainer would, see :mod:`.data`), else the
Trainer's evaluation dataloader.

Example:
    >>> from hf_smoothout.analysis import SharpnessCallback
    >>> callback = SharpnessCallback("hessian_top", dataset=train_ds, max_batches=4)  # doctest: +SKIP
    >>> trainer = SmoothOutTrainer(model, args, train_dataset=train_ds, eval_dataset=eval_ds,
    ...                            callbacks=[callback])                              # doctest: +SKIP
    >>> trainer.train()  # logs eval_sharpness_hessian_top at every evaluation       # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import nn
from transformers import TrainerCallback

from .batches import ForwardFn
from .data import model_dataloader
from .measures import SharpnessOptions, check_measure, measure_sharpness


class SharpnessCallback(TrainerCallback):
    """Adds sharpness measures to the metrics and logs of every evaluation.

    Args:
        measure: one name of :data:`~hf_smoothout.analysis.measures.MEASURES` or a sequence of them.
        dataloader: batches to measure on (mappings of model inputs with ``labels``).
        dataset: examples to measure on, batched with ``batch_size`` (default: the eval batch size).
        max_batches: batches per measurement (bounds the cost; overrides ``options.max_batches``).
        batch_size: batch size for ``dataset``.
        collate_fn: collator for ``dataset`` (default: padding with the Trainer's tokenizer, if any).
        options: knobs of the measures; keyword arguments (``epsilon=``, ``subspace_dim=``,
            ``repeats=``, ``power_iterations=``, ``trace_samples=``, ``seed=`` ...) override its fields.
        forward_fn: ``forward_fn(model, batch)`` returning the output; default ``model(**batch)``.
        progress: show tqdm bars during the measurement.
    """

    def __init__(
        self,
        measure: str | Sequence[str] = "epsilon",
        dataloader: Iterable[Mapping[str, Any]] | None = None,
        dataset: Any | None = None,
        *,
        max_batches: int = 4,
        batch_size: int | None = None,
        collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
        options: SharpnessOptions | None = None,
        forward_fn: ForwardFn | None = None,
        progress: bool = False,
        **option_overrides: Any,
    ) -> None:
        self.measures = [measure] if isinstance(measure, str) else list(measure)
        if not self.measures:
            raise ValueError("SharpnessCallback needs at least one measure.")
        for name in self.measures:
            check_measure(name)
        if dataloader is not None and dataset is not None:
            raise ValueError("Pass either dataloader or dataset to SharpnessCallback, not both.")
        known = {f.name for f in dataclasses.fields(SharpnessOptions)}
        if unknown := sorted(set(option_overrides) - known):
            raise ValueError(f"Unknown SharpnessCallback options {unknown}; known: {sorted(known)}.")
        self.options = dataclasses.replace(options or SharpnessOptions(), **option_overrides, max_batches=max_batches)
        self.dataloader = dataloader
        self.dataset = dataset
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.forward_fn = forward_fn
        self.progress = progress
        self.trainer: Any | None = None
        self._dataset_loader: Iterable[Mapping[str, Any]] | None = None

    def attach(self, trainer: Any) -> SharpnessCallback:
        """Add this callback to ``trainer`` and log the measures through ``trainer.log`` (seen by integrations)."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def _loader(self, args: Any, model: nn.Module, kwargs: dict[str, Any]) -> Iterable[Mapping[str, Any]]:
        if self.dataloader is not None:
            return self.dataloader
        if self.dataset is not None:
            if self._dataset_loader is None:
                self._dataset_loader = model_dataloader(
                    self.dataset,
                    model,
                    batch_size=self.batch_size or args.per_device_eval_batch_size,
                    tokenizer=_tokenizer(kwargs.get("processing_class")),
                    collate_fn=self.collate_fn,
                )
            return self._dataset_loader
        loader = kwargs.get("eval_dataloader")
        if loader is None:
            raise ValueError("SharpnessCallback has no data: pass dataloader= or dataset=, or evaluate on a dataset.")
        return loader

    def compute(
        self, model: nn.Module, dataloader: Iterable[Mapping[str, Any]], prefix: str = "eval"
    ) -> dict[str, float]:
        """The metrics this callback adds, computed on ``dataloader`` (the model is left untouched)."""
        start = time.perf_counter()
        values: dict[str, float] = {}
        for name in self.measures:
            result = measure_sharpness(
                model, dataloader, name, self.options, forward_fn=self.forward_fn, progress=self.progress
            )
            key = f"{prefix}_sharpness_{name}"
            values[key] = result.value
            spread = (name.startswith("epsilon") and self.options.repeats > 1) or (
                name == "hessian_trace" and self.options.trace_samples > 1
            )
            if spread:
                values[f"{key}_std"] = result.std
        values[f"{prefix}_sharpness_runtime"] = round(time.perf_counter() - start, 4)
        return values

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):  # type: ignore[override]
        """Measure, then add the values to ``metrics`` and to the log (see the module docstring)."""
        if model is None:
            return
        prefix = _metric_prefix(metrics)
        values = self.compute(model, self._loader(args, model, kwargs), prefix)
        if metrics is not None:
            metrics.update(values)
        if self.trainer is not None:
            self.trainer.log(dict(values))
            return
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and f"{prefix}_runtime" in last:
            last.update(values)
        else:
            state.log_history.append({**values, "epoch": state.epoch, "step": state.global_step})


def _metric_prefix(metrics: Mapping[str, Any] | None) -> str:
    """The evaluation's metric prefix, read from its ``<prefix>_runtime`` key (``eval`` if absent)."""
    for key in metrics or {}:
        if key.endswith("_runtime") and "sharpness" not in key:
            return key[: -len("_runtime")]
    return "eval"


def _tokenizer(processing_class: Any) -> Any | None:
    """The tokenizer inside a Trainer's ``processing_class`` (a tokenizer or a processor), if any."""
    if processing_class is None:
        return None
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    return tokenizer if callable(getattr(tokenizer, "pad", None)) else None
