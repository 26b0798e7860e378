"""Trainer pieces the Fashion-MNIST studies share: quiet training arguments and a per-epoch recorder.

* :func:`study_training_arguments` -- ``SmoothOutTrainingArguments`` for a study run: no reports, checkpoints,
  evaluation or progress bars, logs once per epoch, every example kept (the last batch may be partial).
* :class:`EpochRecorder` -- per epoch: the LR at its start, its training wall time and, optionally, the accuracy
  at its end.

Example:
    >>> args = study_training_arguments(output_dir="/tmp/run", seed=0, use_cpu=True)
    >>> args.report_to, args.disable_tqdm, args.dataloader_drop_last
    ([], True, False)
"""

from __future__ import annotations

import time
from typing import Any

from torch import nn
from transformers import TrainerCallback

from hf_smoothout import SmoothOutTrainingArguments

from .fmnist_common import TensorExamples, evaluate_accuracy

QUIET_RUN = {
    "report_to": "none",
    "save_strategy": "no",
    "eval_strategy": "no",
    "logging_strategy": "epoch",
    "disable_tqdm": True,
    "dataloader_num_workers": 0,
    "dataloader_drop_last": False,
}
"""The arguments every study run shares (any of them can be overridden)."""


def study_training_arguments(**settings: Any) -> SmoothOutTrainingArguments:
    """:data:`QUIET_RUN` with ``settings`` (the run's own: output folder, seed, batch, LR, noise, ...) on top."""
    return SmoothOutTrainingArguments(**{**QUIET_RUN, **settings})


class EpochRecorder(TrainerCallback):
    """Per epoch: the LR at its start, its training wall time (evaluation excluded) and, optionally, the
    accuracy of the model on ``eval_data`` at its end (eval mode).

    Example:
        >>> recorder = EpochRecorder(nn.Linear(1, 1), eval_data=None, batch_size=8)
        >>> recorder.lrs, recorder.seconds, recorder.accuracies
        ([], [], [])
    """

    def __init__(self, model: nn.Module, eval_data: TensorExamples | None, batch_size: int) -> None:
        self.model, self.eval_data, self.batch_size = model, eval_data, batch_size
        self.lrs: list[float] = []
        self.seconds: list[float] = []
        self.accuracies: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        self.lrs.append(float(optimizer.param_groups[0]["lr"]))
        self._start = time.perf_counter()

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        if self.eval_data is not None:
            self.accuracies.append(evaluate_accuracy(self.model, self.eval_data, self.batch_size))
