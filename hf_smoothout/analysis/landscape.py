"""Loss landscapes: the loss and accuracy along a line or over a plane through weight space.

* :func:`interpolation_landscape`: ``theta(alpha) = alpha * theta_B + (1 - alpha) * theta_A`` between
  two solutions of the same architecture (e.g. small- vs large-batch training), ``alpha`` in
  ``[-1, 2]`` by default (``alpha = 0`` is model A, ``1`` is model B). Every floating-point parameter
  and buffer is interpolated (BatchNorm statistics too); integer buffers stay those of model A.
* :func:`random_landscape`: ``theta + alpha * d1`` (1-D) or ``theta + alpha * d1 + beta * d2`` (2-D)
  along random filter-normalized directions (:mod:`.directions`), ``alpha, beta`` in ``[-1, 1]``.

Each point is evaluated on every named dataloader ("train", "validation", ...) on its first
``max_batches`` batches, in eval mode: the curves are ``<split>_loss`` and ``<split>_accuracy``
(NaN when accuracy is undefined). Weights are combined in float64 and cast to each parameter's
dtype, so ``alpha = 0`` (and ``alpha = 1`` for interpolation) reproduce the models bit-exactly.
The models are left bit-identical, in their original modes.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Line(nn.Module):  # loss = (w - 1)^2
    ...     def __init__(self, w):
    ...         super().__init__()
    ...         self.w = nn.Parameter(torch.tensor([w], dtype=torch.float64))
    ...     def forward(self, **batch):
    ...         return {"loss": ((self.w - 1.0) ** 2).sum()}
    >>> data = {"train": [{"labels": torch.zeros(1)}]}
    >>> result = interpolation_landscape(Line(0.0), Line(2.0), data, alphas=[0.0, 0.5, 1.0], progress=False)
    >>> result.metrics["train_loss"]
    [1.0, 0.0, 1.0]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .batches import ForwardFn, collect_batches, model_device
from .directions import filter_normalized_direction
from .objective import BatchObjective
from .params import ParameterVector
from .state import preserved_model

Batches = Iterable[Mapping[str, Any]]
Dataloaders = Mapping[str, Batches] | Batches
"""Named dataloaders (``{"train": ..., "validation": ...}``), or one dataloader (named ``"train"``)."""

INTERPOLATION_ALPHAS = (-1.0, 2.0, 31)
RANDOM_1D_ALPHAS = (-1.0, 1.0, 21)
RANDOM_2D_ALPHAS = (-1.0, 1.0, 11)


@dataclass
class LandscapeResult:
    """Curves of a landscape.

    ``kind`` is ``"interpolation"``, ``"random_1d"`` or ``"random_2d"``. ``metrics`` maps
    ``<split>_loss`` / ``<split>_accuracy`` to one value per ``alpha`` (1-D) or to a list per
    ``alpha`` of one value per ``beta`` (2-D). ``info`` records how the curves were made.
    """

    kind: str
    alphas: list[float]
    metrics: dict[str, list[Any]]
    betas: list[float] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def splits(self) -> list[str]:
        """Names of the dataloaders, in order."""
        return [name[: -len("_loss")] for name in self.metrics if name.endswith("_loss")]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (NaN kept as float NaN)."""
        return asdict(self)


def _grid(values: Sequence[float] | None, default: tuple[float, float, int], name: str) -> list[float]:
    points = np.linspace(*default) if values is None else np.asarray(values, dtype=np.float64).reshape(-1)
    if points.size == 0 or not np.all(np.isfinite(points)):
        raise ValueError(f"{name} must be a non-empty sequence of finite numbers.")
    return [float(v) for v in points]


def _named(dataloaders: Dataloaders) -> dict[str, Batches]:
    named = dict(dataloaders) if isinstance(dataloaders, Mapping) else {"train": dataloaders}
    if not named:
        raise ValueError("At least one dataloader is needed.")
    return named


class _Evaluator:
    """Loss and accuracy of the model's current weights on every named set of batches."""

    def __init__(
        self, model: nn.Module, dataloaders: Dataloaders, max_batches: int | None, forward_fn: ForwardFn | None
    ) -> None:
        device = model_device(model)
        self.objectives = {
            name: BatchObjective(model, collect_batches(loader, max_batches, device), forward_fn)
            for name, loader in _named(dataloaders).items()
        }

    def __call__(self) -> dict[str, float]:
        values = {}
        for name, objective in self.objectives.items():
            values[f"{name}_loss"], values[f"{name}_accuracy"] = objective.evaluate()
        return values

    @property
    def num_examples(self) -> dict[str, int]:
        return {name: o.num_examples for name, o in self.objectives.items()}


def _floating_state(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    return {name: t for name, t in tensors.items() if t.is_floating_point()}


def _check_same_architecture(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    problems = []
    if missing := sorted(set(a) - set(b)):
        problems.append(f"only in model A: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if extra := sorted(set(b) - set(a)):
        problems.append(f"only in model B: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    shapes = [f"{n} {tuple(a[n].shape)} vs {tuple(b[n].shape)}" for n in a if n in b and a[n].shape != b[n].shape]
    if shapes:
        problems.append(f"different shapes: {'; '.join(shapes[:5])}{' ...' if len(shapes) > 5 else ''}")
    if problems:
        raise ValueError("Cannot interpolate between models of different architectures (" + "; ".join(problems) + ").")


def interpolation_landscape(
    model_a: nn.Module,
    model_b: nn.Module,
    dataloaders: Dataloaders,
    *,
    alphas: Sequence[float] | None = None,
    max_batches: int | None = 8,
    forward_fn: ForwardFn | None = None,
    progress: bool = True,
) -> LandscapeResult:
    """Loss and accuracy at ``alpha * theta_B + (1 - alpha) * theta_A`` for every ``alpha``.

    ``alphas`` default: 31 points in ``[-1, 2]``. Evaluation runs on ``model_a`` (its device), whose
    weights are moved and restored; ``model_b`` is only read. ``ValueError`` when the two models do
    not have the same floating-point parameters and buffers (names and shapes).
    """
    grid = _grid(alphas, INTERPOLATION_ALPHAS, "alphas")
    state_a, state_b = _floating_state(model_a), _floating_state(model_b)
    _check_same_architecture(state_a, state_b)
    ParameterVector(model_a)  # refuses a model without trainable parameters
    with preserved_model(model_a), preserved_model(model_b):
        evaluate = _Evaluator(model_a, dataloaders, max_batches, forward_fn)
        start = {n: t.detach().to(torch.float64, copy=True) for n, t in state_a.items()}
        end = {n: state_b[n].detach().to(t.device, torch.float64, copy=True) for n, t in state_a.items()}
        distance = math.sqrt(sum(float((end[n] - start[n]).pow(2).sum()) for n in start))
        curves: dict[str, list[float]] = {}
        for alpha in tqdm(grid, desc="interpolation", disable=not progress):
            with torch.no_grad():
                for name, tensor in state_a.items():
                    tensor.copy_(alpha * end[name] + (1.0 - alpha) * start[name])
            for key, value in evaluate().items():
                curves.setdefault(key, []).append(value)
    info = {"max_batches": max_batches, "num_examples": evaluate.num_examples, "distance": distance}
    return LandscapeResult("interpolation", grid, curves, info=info)


def random_landscape(
    model: nn.Module,
    dataloaders: Dataloaders,
    *,
    dims: int = 1,
    alphas: Sequence[float] | None = None,
    betas: Sequence[float] | None = None,
    seed: int = 0,
    include_one_dim: bool = False,
    max_batches: int | None = 8,
    forward_fn: ForwardFn | None = None,
    progress: bool = True,
) -> LandscapeResult:
    """Loss and accuracy along one (``dims=1``) or two (``dims=2``) random filter-normalized directions.

    ``alphas`` (and ``betas`` for 2-D) default to 21 points (1-D) or 11 x 11 points (2-D) in
    ``[-1, 1]``. The directions come from one CPU generator seeded with ``seed`` (the first direction
    is the same in 1-D and 2-D); ``include_one_dim`` as in :func:`.filter_normalized_direction`.
    """
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 or 2, got {dims!r}.")
    if dims == 1 and betas is not None:
        raise ValueError("betas is only used with dims=2.")
    default = RANDOM_1D_ALPHAS if dims == 1 else RANDOM_2D_ALPHAS
    grid_a = _grid(alphas, default, "alphas")
    grid_b = _grid(betas, default, "betas") if dims == 2 else [0.0]
    with preserved_model(model):
        vector = ParameterVector(model)
        evaluate = _Evaluator(model, dataloaders, max_batches, forward_fn)
        generator = torch.Generator().manual_seed(seed)
        first = filter_normalized_direction(model, include_one_dim=include_one_dim, generator=generator)
        second = (
            filter_normalized_direction(model, include_one_dim=include_one_dim, generator=generator)
            if dims == 2
            else None
        )
        center = [p.detach().to(torch.float64, copy=True) for p in vector.params]
        curves: dict[str, list[Any]] = {}
        bar = tqdm(total=len(grid_a) * len(grid_b), desc=f"random {dims}-D landscape", disable=not progress)
        try:
            for alpha in grid_a:
                row: dict[str, list[float]] = {}
                for beta in grid_b:
                    with torch.no_grad():
                        for i, p in enumerate(vector.params):
                            p.copy_(center[i] + alpha * first[i] + (beta * second[i] if second is not None else 0.0))
                    for key, value in evaluate().items():
                        row.setdefault(key, []).append(value)
                    bar.update(1)
                for key, values in row.items():
                    curves.setdefault(key, []).append(values if dims == 2 else values[0])
        finally:
            bar.close()
    info = {
        "directions": "filter_normalized",
        "seed": seed,
        "include_one_dim": include_one_dim,
        "max_batches": max_batches,
        "num_examples": evaluate.num_examples,
        "num_parameters": vector.numel,
    }
    return LandscapeResult(f"random_{dims}d", grid_a, curves, betas=grid_b if dims == 2 else None, info=info)
