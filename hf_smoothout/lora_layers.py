"""The PEFT LoRA layers whose merged weight ``W + s*B*A`` can receive noise (``space="lora_merged"``).

`find_lora_layers` walks a model for PEFT LoRA ``Linear`` layers (and GPT-2's ``Conv1D`` bases, and bitsandbytes
4-bit and 8-bit bases) and refuses, with what to do instead, every layer whose merged weight the merged space could
not perturb exactly: other layer kinds, other quantization formats, trainable bases, LoRA variants
(DoRA). A `MergedLayer` is one such layer: its base weight (dequantized on demand for a quantized base), its
output-row axis and its adapters.

Example:
    >>> from torch import nn
    >>> from peft import LoraConfig, get_peft_model
    >>> model = get_peft_model(nn.Sequential(nn.Linear(8, 4)), LoraConfig(r=2, target_modules=["0"]))
    >>> [(layer.name, layer.row_axis, layer.numel) for layer in find_lora_layers(model)]
    [('base_model.model.0', 0, 32)]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapters.dtensor import is_dtensor

_QUANTIZED_MODULES = ("bnb", "gptq", "awq", "hqq", "eetq", "torchao", "aqlm", "inc")
_BNB_LORA_CLASSES = ("Linear4bit", "Linear8bitLt")  # peft.tuners.lora.bnb: LoRA on bitsandbytes bases (CUDA)
_BNB_WEIGHTS = ("Params4bit", "Int8Params")  # bitsandbytes' quantized weights, dequantized for the merged space


def _is_bnb_lora(module: nn.Module) -> bool:
    return type(module).__module__.startswith("peft.tuners.lora.bnb") and type(module).__name__ in _BNB_LORA_CLASSES


def _is_bnb_quantized(weight: Any) -> bool:
    return type(weight).__name__ in _BNB_WEIGHTS and not weight.is_floating_point()


_ADAPTER_PARAMETER_NAMES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def _peft_lora() -> Any:
    try:
        from peft.tuners import lora
    except ImportError as err:  # pragma: no cover - peft is what makes a model a LoRA model
        raise ImportError("space='lora_merged' needs PEFT: pip install peft") from err
    return lora


def _is_transformers_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


@dataclass
class MergedLayer:
    """One PEFT LoRA ``Linear`` layer whose merged weight gets noise."""

    name: str
    module: nn.Module  # the peft LoRA layer
    base: nn.Module  # its base layer (nn.Linear, or transformers' Conv1D with fan_in_fan_out)
    index: int  # position in model order: part of the draw's seed
    row_axis: int  # output axis of base.weight: 0 for nn.Linear ([out, in]), 1 for Conv1D ([in, out])
    quantized: bool = False  # a bitsandbytes 4-bit or 8-bit base (QLoRA): dequantized for every noisy pass

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's own weight parameter (packed for a quantized base: never written either way)."""
        return self.base.weight

    @property
    def numel(self) -> int:
        """Elements of the dense (merged) weight."""
        if self.quantized:
            return int(self.base.in_features) * int(self.base.out_features)
        return self.base.weight.numel()

    def dense_weight(self) -> torch.Tensor:
        """``W`` in floating point: the weight itself, or for a quantized base a new dequantized tensor (peft's
        ``dequantize_bnb_weight``: bitsandbytes' own dequantization, what the layer's forward computes with)."""
        if not self.quantized:
            weight = self.base.weight.detach()
            # FSDP2: the unsharded weight inside the layer's forward and backward; gathered (collective) elsewhere
            return weight.full_tensor() if is_dtensor(weight) else weight
        from peft.utils.integrations import dequantize_bnb_weight

        return dequantize_bnb_weight(self.base.weight, state=getattr(self.base, "state", None)).detach()

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The layer's LoRA parameters (they follow the merged-space noise, not the parameter rules)."""
        params = []
        for attr in _ADAPTER_PARAMETER_NAMES:
            container = getattr(self.module, attr, None)
            if isinstance(container, nn.Module):
                params.extend(container.parameters())
            elif isinstance(container, nn.ParameterDict):
                params.extend(container.values())
        return params


def find_lora_layers(model: nn.Module) -> list[MergedLayer]:
    """The PEFT LoRA ``Linear`` layers of ``model``, in model order; anything the merged space cannot handle
    exactly is refused with a ``ValueError`` that says what to do.

    Example:
        >>> from torch import nn
        >>> find_lora_layers(nn.Linear(2, 2))
        []
    """
    lora = _peft_lora()
    layers: list[MergedLayer] = []
    for name, module in model.named_modules():
        if not isinstance(module, lora.LoraLayer):
            continue
        kind = type(module).__name__
        if type(module) is not lora.Linear and not _is_bnb_lora(module):
            quantized = any(word in type(module).__module__ for word in _QUANTIZED_MODULES)
            weight = getattr(getattr(module, "base_layer", None), "weight", None)
            if quantized or (isinstance(weight, torch.Tensor) and not weight.is_floating_point()):
                raise ValueError(
                    f"space='lora_merged': {name!r} is a LoRA layer on a quantized base ({kind}) other than "
                    "bitsandbytes 4-bit or 8-bit (the formats whose dequantization the merged space uses). Use "
                    "space='trainable' (noise on the adapters only), load the base with bitsandbytes, or in bf16/fp32."
                )
            raise ValueError(
                f"space='lora_merged' supports LoRA on Linear layers (and GPT-2's Conv1D); {name!r} is a {kind}. "
                "Restrict LoraConfig.target_modules to linear layers, or use space='trainable'."
            )
        base = module.get_base_layer()
        if not isinstance(base, nn.Linear) and not _is_transformers_conv1d(base):
            raise ValueError(
                f"space='lora_merged': the base layer of {name!r} is a {type(base).__name__}, not nn.Linear or "
                "transformers' Conv1D. Use space='trainable' for this model."
            )
        weight = base.weight
        quantized = _is_bnb_quantized(weight)
        if not weight.is_floating_point() and not quantized:
            raise ValueError(
                f"space='lora_merged': {name!r} has a non-floating base weight ({weight.dtype}) that is no "
                "bitsandbytes 4-bit or 8-bit weight. Noise in the merged weight space needs a floating-point or "
                "bitsandbytes base. Use space='trainable' (noise on the adapters only), or load the base in bf16/fp32."
            )
        if weight.requires_grad:
            raise ValueError(
                f"space='lora_merged': the base weight of {name!r} is trainable. The merged space computes the "
                "input gradient only (the base must stay frozen, as LoRA trains it); freeze it, or use "
                "space='trainable'."
            )
        variants = getattr(module, "lora_variant", {}) or {}
        if variants or any(getattr(module, "use_dora", {}).get(a, False) for a in module.lora_A):
            raise ValueError(
                f"space='lora_merged': {name!r} uses a LoRA variant ({', '.join(variants) or 'DoRA'}), whose "
                "effective weight is not W + s*B*A. Use plain LoRA, or space='trainable'."
            )
        row_axis = 1 if getattr(module, "fan_in_fan_out", False) or _is_transformers_conv1d(base) else 0
        layers.append(MergedLayer(name, module, base, len(layers), row_axis, quantized))
    return layers


def adapter_parameter_ids(layers: list[MergedLayer]) -> set[int]:
    """``id`` of every adapter parameter of ``layers`` (left out of the engine's per-parameter noise)."""
    return {id(p) for layer in layers for p in layer.adapter_parameters()}
