"""SmoothOut in the merged weight space of PEFT LoRA layers (Flat-LoRA style), exact and without a base copy.

A LoRA ``Linear`` layer computes with the effective weight ``W' = W + sum_k s_k B_k A_k`` (``W`` frozen, the
adapters ``A_k``, ``B_k`` trained). With ``space="lora_merged"`` the noise ``tau`` of the configured law is
scaled against ``W'`` (for ``adapt="filter"``: every output row of ``tau`` has L2 norm ``a * ||W'_row||``)
and the layer computes at ``W' + tau``, while the gradient still reaches only the adapters (and a trainable
bias), as if ``W`` itself had been perturbed.

``W`` is never written. While noise is armed, the base layer's forward builds ``W + tau`` in a scratch
buffer shared by all layers, multiplies, and lets the buffer go; its backward regenerates the same ``tau``
from the draw's seed (the per-row scale is kept, a vector per layer) to compute the input gradient. The
frozen base weights are therefore bit-identical after every step by construction, and the extra memory is
a few buffers the size of the largest LoRA layer, not a copy of the model. The forward and the backward
each cost one fill of random numbers and two element-wise passes per layer; no matmul is added.

Quantized bases (QLoRA): a bitsandbytes 4-bit (``nf4``, ``fp4``) or 8-bit base weight is dequantized (PEFT's
``dequantize_bnb_weight``, bitsandbytes' own routine) for each noisy forward and backward pass, so ``W`` is the
dequantized weight the layer computes with; the packed weight and its quantization state are never written.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from peft import LoraConfig, get_peft_model
    >>> from hf_smoothout import SmoothOut, SmoothOutConfig
    >>> model = get_peft_model(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)),
    ...                        LoraConfig(r=2, target_modules=["0", "2"]))
    >>> base = model.base_model.model[0].base_layer.weight.detach().clone()
    >>> engine = SmoothOut(model, SmoothOutConfig(strength=0.05, space="lora_merged", seed=0))
    >>> engine.merged_layer_names
    ['base_model.model.0', 'base_model.model.2']
    >>> with engine.perturbed():
    ...     model(torch.randn(4, 8)).sum().backward()
    >>> torch.equal(model.base_model.model[0].base_layer.weight, base)
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .laws import get_noise_law
from .lora_layers import MergedLayer, adapter_parameter_ids, find_lora_layers
from .noise import NonFiniteNoiseError, draw_, row_norm_shape
from .seeding import MERGED_LAYER_STREAMS, DrawKey, derive_seed, seeded_generator


@dataclass(frozen=True)
class _Armed:
    """What the armed forward passes draw: the law, the effective strength and the draw's identity."""

    key: DrawKey
    adapt: str
    strength: float
    check_finite: bool


class _Scratch:
    """Buffers shared by every layer on one device: built lazily, grown to the largest layer seen."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}
        self._generators: dict[torch.device, torch.Generator] = {}

    def get(self, role: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        key = (role, like.device, dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < like.numel():
            buffer = torch.empty(like.numel(), device=like.device, dtype=dtype)
            self._buffers[key] = buffer
        return buffer[: like.numel()].view(like.shape)

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


def _merged_weight_(layer: MergedLayer, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``W + sum_k s_k B_k A_k`` of the active adapters into the float32 ``out`` (base weight layout), ``weight`` being
    the dense ``W``."""
    module = layer.module
    out.copy_(weight)
    if module.disable_adapters or module.merged:  # the base weight already is the effective weight
        return out
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        a = module.lora_A[adapter].weight.detach().float()  # [r, in]
        b = module.lora_B[adapter].weight.detach().float()  # [out, r]
        scaling = float(module.scaling[adapter])
        if layer.row_axis == 0:
            out.addmm_(b, a, alpha=scaling)
        else:
            out.addmm_(a.t(), b.t(), alpha=scaling)
    return out


def _submodule(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


class MergedSpace:
    """Noise on the merged weights of a model's PEFT LoRA ``Linear`` layers; the engine arms and disarms it.

    Installs a forward wrapper on every base layer at construction (`close` removes them). While not armed
    the wrapper calls the layer's own forward; while armed it computes at ``W + tau``.

    Args:
        layers: from `find_lora_layers`.
    """

    def __init__(self, layers: list[MergedLayer], root: nn.Module | None = None) -> None:
        self.layers = layers
        self.root = root  # the model the layers were found in: arming checks that they are still there
        self._armed: _Armed | None = None
        self._trained: dict[str, tuple[str, ...]] = {}  # layer name -> the adapters active when armed (trained)
        self._scratch = _Scratch()
        self._checked: set[int] = set()
        for layer in layers:
            self._install(layer)

    # ------------------------------------------------------------------ wiring
    def _install(self, layer: MergedLayer) -> None:
        base = layer.base
        current = base.__dict__.get("forward")
        if isinstance(current, _MergedForward):  # an earlier engine's wrapper: take the layer over
            current = current.inner
        base.forward = _MergedForward(base, self, layer, current)  # found by nn.Module.__call__ before the class's

    def close(self) -> None:
        """Remove the forward wrappers (the layers compute as before the engine was built)."""
        self._armed = None
        for layer in self.layers:
            wrapper = layer.base.__dict__.get("forward")
            if isinstance(wrapper, _MergedForward) and wrapper.space is self:
                if wrapper.inner is not None:
                    layer.base.forward = wrapper.inner
                else:
                    del layer.base.forward

    @property
    def attached(self) -> bool:
        """Whether every layer still runs this space's forward wrapper."""
        for layer in self.layers:
            wrapper = layer.base.__dict__.get("forward")
            if not (isinstance(wrapper, _MergedForward) and wrapper.space is self):
                return False
        return True

    # ------------------------------------------------------------------ arming
    def arm(self, key: DrawKey, *, adapt: str, strength: float, check_finite: bool) -> None:
        """From now on forward passes compute at ``W' + tau`` for the draw ``key``."""
        if not self.attached:
            raise RuntimeError(
                "SmoothOut: this engine's forward wrappers were removed from the model's LoRA layers (detach(), or "
                "a newer engine took them over; space='lora_merged'), so it can no longer perturb them. Use the "
                "newest engine, or build a new one."
            )
        for layer in self.layers:
            if layer.module.get_base_layer() is not layer.base:
                raise RuntimeError(
                    f"SmoothOut: the LoRA layer {layer.name!r} holds another base layer than when the engine was "
                    "built (space='lora_merged'). Build a new SmoothOut(model, config) after changing the model."
                )
            if self.root is not None and _submodule(self.root, layer.name) is not layer.module:
                self.close()  # e.g. merge_and_unload(): no wrapper may stay on the standalone merged layers
                raise RuntimeError(
                    f"SmoothOut: the LoRA layer {layer.name!r} is no longer in the model (merge_and_unload(), "
                    "unload() or a replaced module; space='lora_merged'). This engine's forward wrappers are now "
                    "removed; build a new SmoothOut(model, config) to train the changed model."
                )
            if layer.weight.requires_grad:
                raise RuntimeError(
                    f"SmoothOut: the base weight of {layer.name!r} was unfrozen after the engine was built "
                    "(space='lora_merged'); the merged space computes the input gradient only, so it would get no "
                    "gradient. Freeze it again, or use space='trainable'."
                )
        self._trained = {layer.name: tuple(layer.module.active_adapters) for layer in self.layers}
        self._checked.clear()
        self._armed = _Armed(key, adapt, strength, check_finite)

    def trains(self, layer: MergedLayer | None) -> bool:
        """Whether ``layer`` now computes with the adapters that were active when the noise was armed (the ones
        being trained): not with its adapters disabled (``disable_adapter()``, TRL's reference passes) or with
        another adapter set active (a ``"ref"`` adapter)."""
        if layer is None or self._armed is None:
            return False
        module = layer.module
        return not module.disable_adapters and tuple(module.active_adapters) == self._trained.get(layer.name)

    def disarm(self) -> None:
        """Forward passes compute at the clean weights again (nothing to restore: no weight was written)."""
        self._armed = None

    @property
    def is_armed(self) -> bool:
        return self._armed is not None

    @property
    def buffer_bytes(self) -> int:
        """Bytes of the scratch buffers (a few times the largest layer)."""
        return self._scratch.nbytes

    @property
    def num_parameters(self) -> int:
        return sum(layer.numel for layer in self.layers)

    # ------------------------------------------------------------------ the noisy weight
    def _draw(self, layer: MergedLayer, armed: _Armed, like: torch.Tensor) -> torch.Tensor:
        u = self._scratch.get("draw", like, torch.float32)
        key = armed.key
        seed = derive_seed(key.base_seed, key.rank, MERGED_LAYER_STREAMS.id(layer.index), key.draw)
        generator = seeded_generator(seed, u.device, u.dtype, key.distribution, self._scratch.generator(u.device))
        return draw_(u, key.distribution, generator)

    def noisy_weight(
        self, layer: MergedLayer, armed: _Armed, scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``W + tau`` in the layer's dtype (a scratch view valid until the next call) and the per-row scale.

        ``scale`` from an earlier call for the same draw skips the merged-weight norms: the backward pass
        rebuilds exactly the forward's tensor that way.
        """
        weight = layer.dense_weight()  # a quantized base: dequantized here, freed after this pass
        u = self._draw(layer, armed, weight)
        # float32 bases build W + tau in the merged-weight buffer (its norms are taken by then): 2 buffers, not 3
        role = "merged" if weight.dtype == torch.float32 else "noisy"
        noisy = self._scratch.get(role, weight, weight.dtype)
        law = get_noise_law(armed.adapt)  # the engine's own law objects: one implementation for both spaces
        reference = buffers = None
        if law.uses_reference and (scale is None or not law.row_scaled):
            reference = _merged_weight_(layer, weight, self._scratch.get("merged", weight, torch.float32))
        if law.row_scaled and scale is None:  # float32 per-row buffers, whatever the base's dtype
            shape = row_norm_shape(weight, layer.row_axis)
            buffers = tuple(torch.empty(shape, device=weight.device, dtype=torch.float32) for _ in range(2))
        result = law.apply_(
            noisy, weight, u, armed.strength, row_axis=layer.row_axis, buffers=buffers, reference=reference, scale=scale
        )
        return noisy, result if law.row_scaled else None

    def noisy_weights(self) -> dict[str, torch.Tensor]:
        """What the armed forward passes compute with: ``W + tau`` per layer name, as new tensors (for
        inspection and tests; each allocates a copy). Empty when not armed.

        Example:
            >>> import torch
            >>> from peft import LoraConfig, get_peft_model
            >>> from hf_smoothout import SmoothOut, SmoothOutConfig
            >>> model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig(target_modules=["0"]))
            >>> engine = SmoothOut(model, SmoothOutConfig(strength=0.1, space="lora_merged", seed=0))
            >>> with engine.perturbed():
            ...     noisy = engine.merged_space.noisy_weights()["base_model.model.0"]
            >>> base = model.base_model.model[0].base_layer.weight
            >>> round(float((noisy - base).norm(dim=1).div(base.norm(dim=1)).mean()), 3)  # B = 0: W' = W
            0.1
        """
        armed = self._armed
        if armed is None:
            return {}
        return {layer.name: self.noisy_weight(layer, armed)[0].clone() for layer in self.layers}

    def _check(self, layer: MergedLayer, armed: _Armed, noisy: torch.Tensor) -> None:
        if not armed.check_finite or layer.index in self._checked:
            return
        self._checked.add(layer.index)
        peak, clean_peak = (torch.linalg.vector_norm(t, ord=math.inf) for t in (noisy, layer.dense_weight()))
        if not bool(torch.isfinite(peak)) and bool(torch.isfinite(clean_peak)):  # reductions: no layer-sized temp
            raise NonFiniteNoiseError(
                f"SmoothOut: noise of strength {armed.strength:g} (adapt={armed.adapt!r}, space='lora_merged') made "
                f"the finite merged weight of {layer.name!r} non-finite: the strength is far too large."
            )


class _MergedForward:
    """The base layer's forward while a `MergedSpace` is attached: the layer's own forward when not armed, the
    noisy one when armed.

    An object rather than a closure, so that a copy of the model (``copy.deepcopy``, pickling) gets a plain
    forward of its *own* layer, never one that computes with the original's weights or noise.
    """

    def __init__(
        self,
        base: nn.Module,
        space: MergedSpace | None,
        layer: MergedLayer | None,
        inner: Callable[..., torch.Tensor] | None,
    ) -> None:
        self.base, self.space, self.layer, self.inner = base, space, layer, inner

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        armed = self.space._armed if self.space is not None else None
        if armed is not None and not self.space.trains(self.layer):  # type: ignore[union-attr]
            armed = None  # adapters disabled or another adapter active (a reference pass): no noise there
        if armed is None:
            if self.inner is not None:
                return self.inner(x, *args, **kwargs)
            return type(self.base).forward(self.base, x, *args, **kwargs)
        assert self.layer is not None
        if args or kwargs:
            raise TypeError(
                f"SmoothOut (space='lora_merged'): the base layer of {self.layer.name!r} was called with extra "
                f"arguments ({len(args)} positional, {sorted(kwargs)}); the merged-space forward computes "
                "x @ (W + tau)^T + b only. Use space='trainable' for this model."
            )
        return _NoisyBase.apply(x, self.base.bias, self.space, self.layer, armed)

    def __getstate__(self) -> dict[str, Any]:
        return {"base": self.base, "space": None, "layer": None, "inner": self.inner}  # copies compute plainly

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class _NoisyBase(torch.autograd.Function):
    """The base layer at ``W + tau``: forward builds it in scratch; backward rebuilds it from the seed."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, space: MergedSpace, layer: MergedLayer, armed: _Armed
    ) -> torch.Tensor:
        with torch.no_grad():
            noisy, scale = space.noisy_weight(layer, armed)
            space._check(layer, armed, noisy)
            matrix = noisy if layer.row_axis == 0 else noisy.t()  # [out, in]
            out = F.linear(x, matrix, bias)
        ctx.space, ctx.layer, ctx.armed, ctx.scale = space, layer, armed, scale
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            with torch.no_grad():
                noisy, _ = ctx.space.noisy_weight(ctx.layer, ctx.armed, ctx.scale)
                matrix = noisy if ctx.layer.row_axis == 0 else noisy.t()
                grad_x = grad_out.matmul(matrix.to(grad_out.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None, None, None


def build_merged_space(model: nn.Module, config: Any, selected: list[Any]) -> tuple[MergedSpace | None, list[Any]]:
    """``space="lora_merged"``: the `MergedSpace` over the LoRA layers ``config`` selects (``None`` when the strength
    is 0) and ``selected`` without the adapters' own parameters (they receive no noise in place).

    Raises:
        ValueError: when the model has no PEFT LoRA Linear layer that include/exclude leave selected.
    """
    layers = [layer for layer in find_lora_layers(model) if config.selects_name(f"{layer.name}.base_layer.weight")]
    if not layers:
        raise ValueError(
            "SmoothOut: space='lora_merged' found no PEFT LoRA Linear layer in the model (or include/exclude "
            "left none). Wrap the model with peft.get_peft_model(model, LoraConfig(...)) first, or use "
            "space='trainable'."
        )
    adapters = adapter_parameter_ids(layers)
    remaining = [s for s in selected if id(s.param) not in adapters]
    return (MergedSpace(layers, root=model) if config.enabled else None), remaining
