"""Fingerprints of weights for the golden characterization (``tests/golden/noise.json``), shared by
``test_golden.py`` and the multi-process scripts, which put them in their result files."""

from __future__ import annotations

import hashlib

import torch


def fingerprint(tensors: dict[str, torch.Tensor], clean: dict[str, torch.Tensor]) -> dict[str, object]:
    """SHA-256 of ``tensors`` (by name), and the sum and sum of squares of ``tensors - clean``."""
    digest = hashlib.sha256()
    total, squares = 0.0, 0.0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(name.encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes())
        noise = t.double() - clean[name].detach().cpu().double()
        total += float(noise.sum())
        squares += float(noise.square().sum())
    return {"sha256": digest.hexdigest(), "sum": total, "sumsq": squares}
