"""Which restore the engine runs when ``SmoothOutConfig.restore="auto"`` (the default).

``"swap"`` (the noisy weights in a second buffer, each parameter pointed at it for the forward and backward
pass and back at its untouched clean tensor after) and ``"copy"`` (a backup, copied back) are both exact and
train bit-identically; swap makes two copy passes fewer. Swap changes which storage a parameter points at
while it is perturbed, so ``"auto"`` takes it only where that is proven harmless by the tests
(``tests/test_swap.py``, ``tests/test_ddp.py``, ``tests/test_compile.py``, ``tests/test_restore_choice.py``):
every selected parameter on the CPU, a plain tensor owning its whole contiguous storage, none sharing storage
with another parameter or buffer of the model. Everything else gets ``"copy"``:

* sharded (FSDP2/DTensor) parameters, whose local shards belong to FSDP's storage;
* views into a larger buffer (DeepSpeed ZeRO's flat groups, bucket views), which swapping would cut off;
* tensor subclasses (quantized weights and the like), whose storage carries more than values;
* accelerator devices: CUDA-graph capture (``torch.compile(mode="reduce-overhead")``) replays recorded
  addresses and would read the clean weights, and the swap tests of ``tests/test_cuda.py`` have not yet run
  on a GPU.

Example:
    >>> import torch
    >>> from hf_smoothout import SmoothOutConfig
    >>> resolve_restore(SmoothOutConfig(), [torch.nn.Parameter(torch.zeros(3, 2))], sharded=False)
    'swap'
    >>> flat = torch.zeros(10)
    >>> resolve_restore(SmoothOutConfig(), [torch.nn.Parameter(flat[:6].view(3, 2))], sharded=False)
    'copy'
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import SmoothOutConfig
from ..selection import is_plain_tensor

EXACT_RESTORES = frozenset({"auto", "copy", "swap"})
"""Restores that leave the weights bit-identical to a copy restore: switching between them changes no result."""


def swap_blocker(params: Sequence[torch.Tensor], *, sharded: bool, others: Sequence[torch.Tensor] = ()) -> str | None:
    """Why ``"auto"`` may not swap these parameters (a short reason), or ``None`` when it may.

    ``others``: the model's other tensors (unselected parameters, buffers). A selected parameter sharing storage
    with one of them is copied: swapping would leave that alias clean while the copy restore's noise reaches it.

    Example:
        >>> swap_blocker([torch.nn.Parameter(torch.zeros(2, 2).t())], sharded=False)
        'a parameter is not contiguous'
    """
    if sharded:
        return "parameters are sharded (FSDP2/DTensor)"
    if not params:
        return "no parameter is selected"
    aliased = {t.untyped_storage().data_ptr() for t in others if is_plain_tensor(t)}
    aliased.discard(0)  # meta and empty tensors have no storage to share
    storages: set[int] = set()
    for p in params:
        if p.device.type != "cpu":
            return f"a parameter is on {p.device.type}, not the CPU"
        if not is_plain_tensor(p):
            return f"a parameter is a {type(p).__name__}, not a plain tensor"
        if not p.is_contiguous():
            return "a parameter is not contiguous"
        storage = p.untyped_storage()
        if p.storage_offset() != 0 or storage.nbytes() != p.numel() * p.element_size():
            return "a parameter is a view into a larger buffer (e.g. DeepSpeed's flat groups)"
        if storage.data_ptr() in storages:
            return "two parameters share storage"
        if storage.data_ptr() in aliased:
            return "a parameter shares storage with another tensor of the model"
        storages.add(storage.data_ptr())
    return None


def resolve_restore(
    config: SmoothOutConfig, params: Sequence[torch.Tensor], *, sharded: bool, others: Sequence[torch.Tensor] = ()
) -> str:
    """The restore mode the engine runs for ``params``: ``config.restore``, or for ``"auto"`` swap or copy.

    ``denoise=False`` keeps no restore at all, and no selected parameter needs none: both resolve to ``"copy"``.
    """
    if config.restore != "auto":
        return config.restore
    if not config.denoise:
        return "copy"
    return "copy" if swap_blocker(params, sharded=sharded, others=others) is not None else "swap"
