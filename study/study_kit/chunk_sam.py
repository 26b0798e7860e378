"""SAM with one ascent step per micro-batch (per ghost chunk), for runs that build a large batch by gradient
accumulation: m-sharpness SAM with ``m`` = the micro-batch size, inside the Trainer's accumulation.

``pytorch_optimizer.SAM`` does not compose with the Trainer's accumulation: its ``step`` needs a closure that
recomputes the loss at the perturbed weights for the *same* batch, but the Trainer calls ``step()`` without one
after the last micro-batch, and its ``first_step`` would perturb along the accumulated gradient. So the ascent
step happens here, per micro-batch, in ``training_step``.

* :func:`ascent_step` -- the SAM perturbation ``e = rho * g / (||g|| + eps)`` of a list of gradients.
* :class:`ChunkSAMTrainer` -- the Trainer that takes that step for every micro-batch.

Example:
    >>> ascent_step([torch.tensor([3.0, 0.0]), torch.tensor([4.0])], rho=0.5)  # ||g|| = 5
    [tensor([0.3000, 0.0000]), tensor([0.4000])]
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from hf_smoothout import SmoothOutTrainer

SAM_EPS = 1e-12
"""Added to the gradient norm in the SAM perturbation ``rho * g / (||g|| + eps)``."""


@torch.no_grad()
def ascent_step(grads: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """``rho * g / (||g|| + SAM_EPS)`` per tensor, ``||g||`` the L2 norm over all of them together."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = rho / (norm + SAM_EPS)
    return [g * scale for g in grads]


class ChunkSAMTrainer(SmoothOutTrainer):
    """SAM with one ascent step per micro-batch (ghost chunk): m-sharpness SAM with ``m`` = the chunk size.

    For every chunk: ``g = grad L_chunk(w)`` by ``torch.autograd.grad`` at the clean weights (``.grad`` is not
    touched), ``e = rho * g / (||g|| + 1e-12)`` with the global L2 norm over all trainable parameters, then
    ``w + e``, and the Trainer's own forward + backward there, which adds ``grad L_chunk(w + e) / accumulation``
    into ``.grad``; in ``finally`` the weights are copied back bit-exactly from a copy saved before ``+ e``.
    The Trainer then averages, clips and steps as for every other arm: the step uses the mean over chunks of
    the SAM gradients. Cost: two forward + backward passes per chunk.

    Batch norm: both passes run in train mode, normalizing with their own batch statistics, but only the first
    (clean-weight) pass updates the running statistics: every buffer is saved before the perturbed pass and
    copied back after it (``num_batches_tracked`` too), so the running statistics evolve as in plain SGD.
    The returned (logged) loss is the clean loss, scaled for accumulation as the Trainer scales it.
    Runs SAM alone: the SmoothOut strength must be 0. ``ChunkSAMTrainer(model, args, ..., sam_rho=0.05)``.
    """

    def __init__(self, *args: Any, sam_rho: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.smoothout_config.enabled:
            raise ValueError("ChunkSAMTrainer runs SAM alone: set smoothout_strength=0.")
        if not (isinstance(sam_rho, (int, float)) and math.isfinite(sam_rho) and sam_rho > 0):
            raise ValueError(f"sam_rho must be a positive finite number, got {sam_rho!r}.")
        self.sam_rho = float(sam_rho)

    def sam_perturbation(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The clean chunk loss and ``e`` per trainable parameter (zeros where the loss does not reach)."""
        params = [p for p in model.parameters() if p.requires_grad]
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, self._prepare_inputs(inputs))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        return loss.detach(), ascent_step(grads, self.sam_rho)

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        model.train()
        loss, perturbation = self.sam_perturbation(model, inputs)  # updates the BN running statistics
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            saved_params = [p.detach().clone() for p in params]
            saved_buffers = [b.detach().clone() for b in model.buffers()]
        try:
            with torch.no_grad():
                for p, e in zip(params, perturbation, strict=True):
                    p.add_(e)
            super().training_step(model, inputs, num_items_in_batch)  # forward + backward at w + e
        finally:
            with torch.no_grad():
                for p, saved in zip(params, saved_params, strict=True):
                    p.copy_(saved)
                for b, saved in zip(model.buffers(), saved_buffers, strict=True):
                    b.copy_(saved)
        return loss / getattr(self, "current_gradient_accumulation_steps", 1)
