"""Tensor-level noise laws: draw ``tau`` for a weight tensor, in place, with no allocation.

The three scalings of the method (``../method``):

* ``none``   -- ``tau = a * u`` with ``u ~ U(-1, 1)`` (or ``N(0, 1)``);
* ``weight`` -- ``tau = a * w * u`` (element-wise; ``u`` is symmetric, so this has the law of
  ``a * |w| * u`` and ``|tau| <= a * |w|`` for uniform ``u``);
* ``filter`` -- AdaSmoothOut: per output row, ``tau_row = a * ||w_row|| * u_row / (||u_row|| + 1e-6)``,
  so every row's noise vector has L2 norm ``a * ||w_row||``.

Example:
    >>> import torch
    >>> w = torch.randn(3, 5)
    >>> tau = torch.empty_like(w)
    >>> norms = row_norm_buffers(w, row_axis=0)
    >>> _ = fill_noise_(tau, w, adapt="filter", distribution="uniform", strength=0.1,
    ...                 row_axis=0, generator=torch.Generator().manual_seed(0), norm_buffers=norms)
    >>> torch.allclose(tau.norm(dim=1), 0.1 * w.norm(dim=1), rtol=1e-4)
    True
"""

from __future__ import annotations

import torch

ROW_NORM_EPS = 1e-6


def draw_(out: torch.Tensor, distribution: str, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Fill ``out`` with ``scale * U(-1, 1)`` or ``scale * N(0, 1)`` from ``generator``."""
    if distribution == "uniform":
        return out.uniform_(-scale, scale, generator=generator)
    if distribution == "gaussian":
        return out.normal_(0.0, scale, generator=generator)
    raise ValueError(f"Unknown distribution {distribution!r}; allowed: uniform, gaussian.")


def row_norm_shape(tensor: torch.Tensor, row_axis: int) -> tuple[int, ...]:
    """Shape of the per-row norm of ``tensor`` (kept dims, so it broadcasts against ``tensor``)."""
    if tensor.ndim <= 1:
        return tuple(tensor.shape)
    return tuple(size if dim == row_axis else 1 for dim, size in enumerate(tensor.shape))


def row_norm_buffers(tensor: torch.Tensor, row_axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two preallocated per-row buffers (weight norms, noise norms) for ``fill_noise_``."""
    shape = row_norm_shape(tensor, row_axis)
    return (
        torch.empty(shape, device=tensor.device, dtype=tensor.dtype),
        torch.empty(shape, device=tensor.device, dtype=tensor.dtype),
    )


def row_norms_(tensor: torch.Tensor, row_axis: int, out: torch.Tensor) -> torch.Tensor:
    """L2 norm of every output row of ``tensor`` into ``out`` (``|x|`` for 1-D tensors)."""
    if tensor.ndim <= 1:
        return torch.abs(tensor, out=out)
    dims = tuple(d for d in range(tensor.ndim) if d != row_axis)
    return torch.linalg.vector_norm(tensor, ord=2, dim=dims, keepdim=True, out=out)


def fill_noise_(
    out: torch.Tensor,
    weight: torch.Tensor,
    *,
    adapt: str,
    distribution: str,
    strength: float,
    row_axis: int,
    generator: torch.Generator,
    norm_buffers: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """Overwrite ``out`` with the noise ``tau`` for the clean weights ``weight``.

    ``out`` and ``weight`` have the same shape and must not overlap. Returns the per-row scale
    (``filter`` mode: ``a * ||w_row|| / (||u_row|| + eps)``, held in ``norm_buffers[0]``) so the
    same noise can be rebuilt from the same random draw; ``None`` for the other modes.
    """
    if adapt == "none":
        draw_(out, distribution, generator, strength)
        return None
    if adapt == "weight":
        draw_(out, distribution, generator, strength)
        out.mul_(weight)
        return None
    if adapt == "filter":
        if norm_buffers is None:
            raise ValueError("adapt='filter' needs norm_buffers (see row_norm_buffers).")
        scale, noise_norm = norm_buffers
        draw_(out, distribution, generator)
        row_norms_(weight, row_axis, out=scale)
        row_norms_(out, row_axis, out=noise_norm)
        noise_norm.add_(ROW_NORM_EPS)
        scale.div_(noise_norm).mul_(strength)
        out.mul_(scale)
        return scale
    raise ValueError(f"Unknown adapt mode {adapt!r}; allowed: filter, none, weight.")


def rebuild_noise_(
    out: torch.Tensor,
    *,
    adapt: str,
    distribution: str,
    strength: float,
    generator: torch.Generator,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Redraw the noise of an earlier ``fill_noise_`` call from the same generator state.

    For ``none`` and ``filter`` ``out`` receives ``tau`` itself (``filter`` needs the returned
    ``row_scale``); for ``weight`` it receives the factor ``1 + a * u`` by which the weight was
    multiplied, since ``w`` itself is no longer known.
    """
    if adapt == "none":
        return draw_(out, distribution, generator, strength)
    if adapt == "weight":
        return draw_(out, distribution, generator, strength).add_(1.0)
    if adapt == "filter":
        if row_scale is None:
            raise ValueError("adapt='filter' needs the row_scale returned by fill_noise_.")
        return draw_(out, distribution, generator).mul_(row_scale)
    raise ValueError(f"Unknown adapt mode {adapt!r}; allowed: filter, none, weight.")
