"""Dataloaders of model-ready examples for the measurements (used by the callback and the CLI).

A dataset holds model-ready columns (``input_ids``/``attention_mask``/``labels``,
``pixel_values``/``labels``, ...). Columns the model's ``forward`` does not accept are dropped (as
``Trainer`` does; ``label``/``label_ids`` are kept and become ``labels``), and the examples are
batched with ``DataCollatorWithPadding`` when a tokenizer is given, else ``default_data_collator``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Model(nn.Module):
    ...     def forward(self, x, labels=None):
    ...         return {"loss": x.sum()}
    >>> rows = [{"x": [1.0, 2.0], "label": 1, "text": "hi"}] * 3
    >>> batch = next(iter(model_dataloader(rows, Model(), batch_size=2)))
    >>> sorted(batch), tuple(batch["x"].shape)
    (['labels', 'x'], (2, 2))
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

LABEL_COLUMNS = ("labels", "label", "label_ids")


def forward_arguments(model: nn.Module) -> set[str] | None:
    """Names ``model.forward`` declares (as ``Trainer`` reads them: ``**kwargs`` aside), or ``None`` when it
    declares none (``forward(**batch)``: then every column is kept)."""
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    names = {p.name for p in inspect.signature(model.forward).parameters.values() if p.kind not in variadic}
    return names or None


def _keep(model: nn.Module) -> Callable[[dict[str, Any]], dict[str, Any]]:
    accepted = forward_arguments(model)

    def keep(example: dict[str, Any]) -> dict[str, Any]:
        if accepted is None:
            return dict(example)
        return {k: v for k, v in example.items() if k in accepted or k in LABEL_COLUMNS}

    return keep


def model_dataloader(
    dataset: Dataset | Sequence[dict[str, Any]],
    model: nn.Module,
    *,
    batch_size: int = 32,
    tokenizer: Any | None = None,
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
    shuffle: bool = False,
    seed: int = 0,
) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` yielding model-ready batches (see the module docstring).

    A ``datasets.Dataset`` loses the columns ``model.forward`` does not accept before batching; a
    ``shuffle`` uses its own generator seeded with ``seed`` (torch's global generator is not used).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    accepted = forward_arguments(model)
    column_names = getattr(dataset, "column_names", None)
    if accepted is not None and isinstance(column_names, list):
        unused = [c for c in column_names if c not in accepted and c not in LABEL_COLUMNS]
        if unused:
            dataset = dataset.remove_columns(unused)
    if collate_fn is None:
        from transformers import DataCollatorWithPadding, default_data_collator

        keep = _keep(model)
        base = DataCollatorWithPadding(tokenizer) if tokenizer is not None else default_data_collator

        def collate_fn(examples: list[dict[str, Any]]) -> dict[str, Any]:
            return base([keep(e) for e in examples])

    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_fn, generator=generator)
