"""Bounded, cached batches on the model's device, and reading ``loss``/``logits`` from model outputs.

A measurement evaluates the loss many times; it must see the *same* examples every time, so the
first ``max_batches`` batches of the dataloader are drawn once, moved to the model's device and
reused (a shuffling dataloader is therefore fine).

Example:
    >>> import torch
    >>> loader = [{"x": torch.ones(2, 3), "labels": torch.tensor([0, 1])} for _ in range(5)]
    >>> batches = collect_batches(loader, max_batches=2, device=torch.device("cpu"))
    >>> len(batches), batch_size(batches[0])
    (2, 2)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

ForwardFn = Callable[[nn.Module, Mapping[str, Any]], Any]
"""``forward_fn(model, batch)`` returns the model output (with ``loss``, optionally ``logits``)."""


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model without tensors."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def to_device(value: Any, device: torch.device) -> Any:
    """Move tensors (also nested in mappings, lists and tuples) to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def check_max_batches(max_batches: int | None) -> None:
    """``ValueError`` unless ``max_batches`` is ``None`` (everything) or a positive integer."""
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive integer or None (all batches), got {max_batches!r}.")


def collect_batches(
    dataloader: Iterable[Mapping[str, Any]], max_batches: int | None, device: torch.device
) -> list[dict[str, Any]]:
    """The first ``max_batches`` batches of ``dataloader`` (all if ``None``), moved to ``device``.

    Raises ``ValueError`` for an empty dataloader or batches that are not mappings of model inputs.
    """
    check_max_batches(max_batches)
    batches: list[dict[str, Any]] = []
    for batch in dataloader:
        if max_batches is not None and len(batches) >= max_batches:
            break
        if not isinstance(batch, Mapping):
            raise ValueError(
                f"Batches must be mappings of model inputs (e.g. {{'input_ids': ..., 'labels': ...}}), "
                f"got {type(batch).__name__}."
            )
        batches.append(to_device(dict(batch), device))
    if not batches:
        raise ValueError("The dataloader is empty: at least one batch is needed to measure the loss.")
    return batches


def batch_size(batch: Mapping[str, Any]) -> int:
    """Number of examples in ``batch``: first dimension of ``labels``, else of the first tensor."""
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and labels.ndim > 0:
        return int(labels.shape[0])
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    return 1


def default_forward(model: nn.Module, batch: Mapping[str, Any]) -> Any:
    """``model(**batch)``."""
    return model(**batch)


def _field(output: Any, name: str) -> Any:
    value = getattr(output, name, None)
    if value is None and isinstance(output, Mapping):
        value = output.get(name)
    return value


def output_loss(output: Any) -> torch.Tensor:
    """The scalar ``loss`` of a model output (``output.loss`` or ``output["loss"]``)."""
    if isinstance(output, torch.Tensor) and output.ndim == 0:
        return output
    loss = _field(output, "loss")
    if loss is None:
        raise ValueError(
            f"The model output ({type(output).__name__}) has no 'loss': pass batches with 'labels', or a forward_fn "
            "that returns the loss."
        )
    if loss.ndim != 0:
        loss = loss.mean()
    return loss


def batch_correct(output: Any, batch: Mapping[str, Any]) -> tuple[int, int] | None:
    """(correct, counted) predictions of a classification batch, or ``None`` when accuracy is undefined.

    Predictions are ``logits.argmax(-1)``; labels equal to ``-100`` are ignored. ``None`` without
    logits, without integer labels, or when their shapes do not match.
    """
    logits = _field(output, "logits")
    labels = batch.get("labels")
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        return None
    if labels.is_floating_point() or logits.ndim < 1 or logits.shape[:-1] != labels.shape:
        return None
    mask = labels != -100
    correct = ((logits.argmax(dim=-1) == labels) & mask).sum()
    return int(correct), int(mask.sum())
