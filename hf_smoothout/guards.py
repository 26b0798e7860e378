"""Checks the engine runs on its inputs and state: refusals with a message that says what to do, and warnings.

Example:
    >>> from torch import nn
    >>> from hf_smoothout import SmoothOutConfig
    >>> check_restore_mode(SmoothOutConfig(restore="regenerate"), world_size=1)  # fine in one process
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .config import SmoothOutConfig
from .laws import get_noise_law
from .noise import NonFiniteNoiseError, typical_relative_noise
from .selection import SelectedParameter

if TYPE_CHECKING:
    from .placement import Placement
    from .plan import Slot

_SEED_LIMIT = 2**64


def module_tensor_attributes(model: nn.Module) -> list[torch.Tensor]:
    """Tensors the model's modules hold as plain attributes (neither parameter nor buffer), directly or in a list,
    tuple or dict: ``self.w_t = self.lin.weight.data.t()`` keeps an alias of a weight that ``model.parameters()``
    does not show (the ``"auto"`` restore copies rather than swaps such a weight).

    Example:
        >>> from torch import nn
        >>> layer = nn.Linear(2, 2)
        >>> layer.w_t = layer.weight.data.t()
        >>> [t.shape for t in module_tensor_attributes(layer)]
        [torch.Size([2, 2])]
    """
    found: list[torch.Tensor] = []
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, dict):
                items = list(value.values())
            else:
                items = list(value) if isinstance(value, (list, tuple)) else [value]
            found.extend(v for v in items if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter))
    return found


def check_no_forward_writes(selected: list[SelectedParameter]) -> None:
    """Refuse selected weights that their own forward pass rewrites: ``nn.Embedding(max_norm=...)`` renormalizes
    the rows it looks up in place, which the restore after the backward pass would undo.

    Example:
        >>> from torch import nn
        >>> from hf_smoothout.selection import select_parameters
        >>> try:
        ...     check_no_forward_writes(select_parameters(nn.Embedding(4, 2, max_norm=1.0), SmoothOutConfig()))
        ... except ValueError as err:
        ...     print(str(err)[:60])
        SmoothOut: 'weight' belongs to nn.Embedding(max_norm=1), who
    """
    for sel in selected:
        if isinstance(sel.module, nn.Embedding) and sel.module.max_norm is not None:
            raise ValueError(
                f"SmoothOut: {sel.name!r} belongs to nn.Embedding(max_norm={sel.module.max_norm:g}), whose forward "
                "renormalizes the looked-up rows in place; restoring the clean weights after the backward pass would "
                "undo that. Leave it out with config.exclude (e.g. exclude=[...embedding name...]), or set "
                "max_norm=None."
            )


def check_restore_mode(config: SmoothOutConfig, world_size: int) -> None:
    """Raise ``ValueError`` when ``config.restore`` cannot keep data-parallel replicas identical.

    Example:
        >>> check_restore_mode(SmoothOutConfig(restore="regenerate"), world_size=1)
    """
    if config.restore == "regenerate" and config.denoise and config.independent_ranks and world_size > 1:
        raise ValueError(
            "restore='regenerate' is refused when ranks draw different noise (independent_ranks=True with "
            f"world_size={world_size}): its rounding drift differs per rank and data-parallel replicas "
            "would diverge for good. Use restore='copy' (bit-exact), or independent_ranks=False."
        )


def warn_if_implausible_strength(config: SmoothOutConfig, params: list[torch.Tensor]) -> bool:
    """Warn when one draw's noise would typically be larger than the weights themselves. Returns whether it warned.

    Example:
        >>> import torch
        >>> warn_if_implausible_strength(SmoothOutConfig(strength=0.01), [torch.ones(3, 3)])
        False
    """
    params = [p for p in params if p.is_floating_point()]  # quantized (packed) weights carry no magnitudes
    if not config.enabled or not params:
        return False
    if get_noise_law(config.adapt).relative:
        implausible, what = config.strength > 1.0, f"strength {config.strength:g} > 1 with adapt={config.adapt!r}"
    else:
        relative = typical_relative_noise(config, params)
        implausible, what = relative > 1.0, f"typical |noise| / |weight| of {relative:.3g} with adapt='none'"
    if implausible:
        warnings.warn(
            f"SmoothOut: {what}: the noise is larger than the weights it perturbs, which destroys what the model "
            "computes. Typical strengths are 1e-3 to 5e-2 (adapt='filter' or 'weight'), or about 1e-4 to 1e-2 "
            "for adapt='none' (an absolute box, compare it with your weights' scale).",
            UserWarning,
            stacklevel=3,
        )
    return implausible


def validate_state(state: Any) -> None:
    """Raise ``ValueError`` unless ``state`` is a SmoothOut noise state (as `SmoothOut.state_dict` returns).

    Example:
        >>> validate_state({"base_seed": 1, "draws": -2})
        Traceback (most recent call last):
        ...
        ValueError: Not a valid SmoothOut state: draws=-2 (must be an integer >= 0).
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"Not a SmoothOut state: expected a dict, got {type(state).__name__}.")
    missing = {"base_seed", "draws"} - set(state)
    if missing:
        raise ValueError(f"Not a SmoothOut state: missing {sorted(missing)}.")
    for name, limit in (("base_seed", _SEED_LIMIT), ("draws", None)):
        value = state[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (limit and value >= limit):
            raise ValueError(
                f"Not a valid SmoothOut state: {name}={value!r} (must be an integer >= 0"
                f"{' and < 2**64' if limit else ''})."
            )


# ---------------------------------------------------------------------------------------------- bindings
def replaced_slot(slots: Sequence[Slot]) -> Slot | None:
    """The first slot whose parameter object is no longer the one its module holds, else ``None``."""
    for slot in slots:
        if slot.module is not None and slot.module._parameters.get(slot.local_name) is not slot.param:
            return slot
    return None


def check_not_replaced(slots: Sequence[Slot]) -> None:
    """Refuse a selected parameter object that was replaced in its module after the engine was built."""
    replaced = replaced_slot(slots)
    if replaced is not None:
        raise RuntimeError(
            f"SmoothOut: the model's parameter {replaced.name!r} was replaced by a different Parameter object "
            "after this engine was built (e.g. load_state_dict(..., assign=True), or assigning "
            "module.weight = nn.Parameter(...)). The engine would perturb the old object, which no longer "
            "takes part in the forward pass. Build a new SmoothOut(model, config) after replacing "
            "parameters (and a new optimizer, which holds the old objects too)."
        )


def storage_changed(slots: Sequence[Slot], placement: Placement) -> bool:
    """Whether a parameter's values moved to other storage, shape, dtype, device or strides since the plan."""
    for slot in slots:
        data, live = slot.data, placement.live(slot.param)
        if (
            live.data_ptr() != data.data_ptr()
            or live.shape != data.shape
            or live.dtype != data.dtype
            or live.device != data.device
            or live.stride() != data.stride()
        ):
            return True
    return False


def versions(slots: Sequence[Slot], placement: Placement) -> list[int]:
    """Version counters of the tensors holding the selected weights (bumped by every in-place write)."""
    return [placement.live(slot.param)._version for slot in slots]


def written_slot(
    slots: Sequence[Slot], placement: Placement, since: Sequence[int], moved: Collection[int]
) -> str | None:
    """The first weight (not in ``moved``) written in place since the version counters ``since`` were taken."""
    if len(since) != len(slots):
        return None
    for slot, version in zip(slots, since, strict=True):
        if id(slot) not in moved and placement.live(slot.param)._version != version:
            return slot.name
    return None


def untouched_since(slots: Sequence[Slot], placement: Placement, since: Sequence[int]) -> bool:
    """Whether no selected weight was written, re-bound or replaced since ``since`` was taken."""
    if replaced_slot(slots) is not None or len(since) != len(slots):
        return False
    for slot, version in zip(slots, since, strict=True):
        live = placement.live(slot.param)
        if live.data_ptr() != slot.data.data_ptr() or live._version != version:
            return False
    return True


def moved_slots(
    slots: Sequence[Slot], placement: Placement, expected: Callable[[Slot], torch.Tensor]
) -> dict[int, tuple[Slot, torch.Tensor, bool]]:
    """Parameters no longer on the storage ``expected(slot)`` names (a wrapper moved them while noisy):
    ``id(slot) -> (slot, live tensor, recoverable)``, where recoverable means the new storage holds exactly the
    noisy values (checked before anything is restored)."""
    moved: dict[int, tuple[Slot, torch.Tensor, bool]] = {}
    for slot in slots:
        live, want = placement.live(slot.param), expected(slot)
        if live.numel() and live.data_ptr() != want.data_ptr():
            same = live.shape == want.shape and live.dtype == want.dtype and live.device == want.device
            live_data = live.data if isinstance(live, nn.Parameter) else live
            moved[id(slot)] = (slot, live_data, same and bool(torch.equal(live_data, want)))
    return moved


def all_finite(tensors: Sequence[torch.Tensor], placement: Placement) -> bool:
    """Whether every tensor is finite (one max-abs reduction per tensor, one sync per device), as all ranks agree."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for tensor in tensors:
        if tensor.numel():  # a shard may hold no rows (a 2-row head over 4 ranks): nothing to check there
            by_device.setdefault(tensor.device, []).append(tensor)
    finite = True
    for group in by_device.values():
        peaks = torch._foreach_norm(group, ord=math.inf)
        finite = finite and bool(torch.stack([p.float() for p in peaks]).isfinite().all())
    return placement.agree(finite, tensors[0].device) if tensors else finite


# ---------------------------------------------------------------------------------------------- errors
def non_finite_noise_error(strength: float, adapt: str, name: str) -> NonFiniteNoiseError:
    """The error of finite weights made non-finite by the noise (``name``: the first such parameter)."""
    return NonFiniteNoiseError(
        f"SmoothOut: noise of strength {strength:g} (adapt={adapt!r}) made finite weights non-finite (first in "
        f"{name!r}): the strength is far too large for these weights. Lower it (typical: 1e-3 to 5e-2 with "
        "adapt='filter')."
    )


def moved_storage_error(name: str) -> RuntimeError:
    """The error of a weight whose storage was replaced, by values that are no copy of the noisy ones, while noisy."""
    return RuntimeError(
        f"SmoothOut: the storage of {name!r} was replaced while the weights were perturbed, and its "
        "new values are no plain copy of the noisy ones (model.to(dtype), .half(), load_state_dict(..., "
        "assign=True) or p.data = ... between perturb and restore): that noise cannot be removed any more. "
        "Convert or load the model only while SmoothOut is not perturbed (outside perturbed() and "
        "training_step)."
    )


def written_in_window_error(name: str) -> RuntimeError:
    """The error of a weight written in place while the noise was in it."""
    return RuntimeError(
        f"SmoothOut: {name!r} was written while the noise was in the weights (inside the forward or "
        "backward pass): an optimizer step inside backward (a register_post_accumulate_grad_hook calling "
        "optimizer.step(), LOMO-style), nn.Embedding(max_norm=...) renormalizing rows, or another in-place "
        "update. Removing the noise would silently undo or corrupt that write, so SmoothOut stops here, "
        "the noise removed (with copy or swap the weights are back at their values before the noise and "
        "that write is lost). Step the optimizer after the "
        "backward pass, set the embedding's max_norm=None, or leave the parameter out with config.exclude."
    )


def state_differences(state: Mapping[str, Any], config: SmoothOutConfig, exact_restores: Collection[str]) -> list[str]:
    """The settings in which a saved noise state (`SmoothOut.state_dict`) differs from ``config`` in a way that
    changes the run, as ``"field: saved -> current"`` lines (the saved seed is the one kept)."""
    differences = []
    saved = state.get("config")
    if isinstance(saved, Mapping):
        current = config.to_dict()
        for name in SmoothOutConfig.field_names():
            if name == "seed" or name not in saved or saved[name] == current[name]:
                continue
            if name == "prefetch" or (name == "restore" and {saved[name], current[name]} <= set(exact_restores)):
                continue  # the same noise and the same weights either way: the run does not change
            if name == "kernel" and "triton" not in {saved[name], current[name]}:
                continue  # every other kernel draws the reference numbers
            differences.append(f"{name}: {saved[name]!r} -> {current[name]!r}")
    seed = state["base_seed"]
    if config.seed is not None and config.seed != seed:
        differences.append(f"seed: {seed!r} -> {config.seed!r} (the saved seed {seed} is kept)")
    return differences
