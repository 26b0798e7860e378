"""The loss ``f`` every measurement works on: the mean loss over a fixed set of batches.

``f(theta) = sum_b n_b * loss_b(theta) / sum_b n_b`` where ``loss_b`` is the model's (mean) loss
on batch ``b`` and ``n_b`` its number of examples, accumulated in float64. The model should be in
``eval()`` mode (dropout off) so that ``f`` is a deterministic function of the weights; the
measurements arrange that. Gradients and Hessian-vector products are taken with respect to the
trainable parameters and returned in float64.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Square(nn.Module):  # loss = w^2, batches ignored
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = nn.Parameter(torch.tensor([3.0]))
    ...     def forward(self, **batch):
    ...         return {"loss": (self.w ** 2).sum()}
    >>> model = Square()
    >>> f = BatchObjective(model, [{"labels": torch.zeros(2)}])
    >>> f.loss()
    9.0
    >>> value, grads = f.loss_and_grad([model.w])
    >>> float(grads[0]), float(f.hessian_vector_product([model.w], [torch.ones(1)])[0])
    (6.0, 2.0)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .batches import ForwardFn, batch_correct, batch_size, default_forward, output_loss


@contextlib.contextmanager
def _twice_differentiable_attention() -> Iterator[None]:
    """Route scaled-dot-product attention to the math kernel: the fused kernels have no double backward."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _explain_double_backward(error: RuntimeError) -> RuntimeError:
    if "derivative for" in str(error) and "not implemented" in str(error):
        return RuntimeError(
            f"{error}. Hessian measures need a twice-differentiable model; load it with "
            "attn_implementation='eager' (or 'sdpa') rather than a fused attention kernel."
        )
    return error


class BatchObjective:
    """``f`` over the fixed ``batches`` (already on the model's device), with its gradient and HVPs."""

    def __init__(
        self, model: nn.Module, batches: Sequence[Mapping[str, Any]], forward_fn: ForwardFn | None = None
    ) -> None:
        if not batches:
            raise ValueError("The dataloader is empty: at least one batch is needed to measure the loss.")
        self.model = model
        self.batches = list(batches)
        self.forward_fn = forward_fn or default_forward
        sizes = [batch_size(b) for b in self.batches]
        total = sum(sizes)
        self.weights = [n / total for n in sizes]
        self.num_examples = total

    def _forward(self, batch: Mapping[str, Any]) -> Any:
        return self.forward_fn(self.model, batch)

    def loss(self) -> float:
        """``f`` at the current weights."""
        return self.evaluate(accuracy=False)[0]

    def evaluate(self, accuracy: bool = True) -> tuple[float, float]:
        """``(f, accuracy)`` at the current weights; accuracy is NaN when undefined (no logits, regression)."""
        total = 0.0
        correct, counted, defined = 0, 0, accuracy
        with torch.no_grad():
            for batch, weight in zip(self.batches, self.weights, strict=True):
                output = self._forward(batch)
                total += weight * float(output_loss(output).double())
                if defined:
                    hits = batch_correct(output, batch)
                    if hits is None:
                        defined = False
                    else:
                        correct, counted = correct + hits[0], counted + hits[1]
        acc = correct / counted if defined and counted else math.nan
        return total, acc

    def loss_and_grad(self, params: Sequence[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
        """``f`` and its gradient with respect to ``params`` (float64, on each parameter's device)."""
        total = 0.0
        grads = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in params]
        with torch.enable_grad():
            for batch, weight in zip(self.batches, self.weights, strict=True):
                loss = output_loss(self._forward(batch))
                total += weight * float(loss.detach().double())
                parts = torch.autograd.grad(loss, list(params), allow_unused=True)
                for acc, part in zip(grads, parts, strict=True):
                    if part is not None:
                        acc.add_(part.double(), alpha=weight)
        return total, grads

    def hessian_vector_product(
        self, params: Sequence[torch.Tensor], vector: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """``H v`` where ``H`` is the Hessian of ``f`` with respect to ``params`` (double backward, float64)."""
        out = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in params]
        with torch.enable_grad(), _twice_differentiable_attention():
            for batch, weight in zip(self.batches, self.weights, strict=True):
                try:
                    loss = output_loss(self._forward(batch))
                    grads = torch.autograd.grad(loss, list(params), create_graph=True, allow_unused=True)
                    used = [(g, v, i) for i, (g, v) in enumerate(zip(grads, vector, strict=True)) if g is not None]
                    dot = sum((g * v.to(g.dtype)).sum() for g, v, _ in used) if used else None
                    if dot is None or not dot.requires_grad:
                        continue  # f is linear in the parameters on this batch: zero curvature
                    parts = torch.autograd.grad(dot, [params[i] for _, _, i in used], allow_unused=True)
                except RuntimeError as error:
                    raise _explain_double_backward(error) from error
                for (_, _, i), part in zip(used, parts, strict=True):
                    if part is not None:
                        out[i].add_(part.double(), alpha=weight)
        return out
