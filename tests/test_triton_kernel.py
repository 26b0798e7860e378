"""The fused Triton kernel, checked on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``).

Its numbers are its own (Philox), so it is checked against the law, not against the reference numbers: per-row norms
to rounding, the uniform box, Gaussian moments, determinism and independence from the launch grid, the noise keyed
like every other draw (resume), exact restores, rows longer than a block, empty, 0-D and 1-D parameters, bf16.
Skipped where triton is not installed (``pip install 'hf-smoothout[gpu]'``).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

pytest.importorskip("triton", reason="triton is not installed (the [gpu] extra)")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "runs under Triton's interpreter (machines without CUDA; tests/test_cuda.py on a GPU)", allow_module_level=True
    )

from hf_smoothout import SmoothOut, SmoothOutConfig
from hf_smoothout.laws import NOISE_LAWS
from hf_smoothout.selection import select_parameters


class Net(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(24, 16)
        self.conv = nn.Conv1d(4, 6, 3)
        self.long_rows = nn.Linear(1500, 3, bias=False)  # rows longer than a row block
        self.scalar = nn.Parameter(torch.tensor(0.7))
        self.empty = nn.Parameter(torch.empty(0, 5))
        from transformers.pytorch_utils import Conv1D

        self.transposed = Conv1D(7, 5)  # stored [in, out]: rows along axis 1
        self.to(dtype)


def noise_of(config: SmoothOutConfig, dtype: torch.dtype = torch.float32, draws: int = 1):
    net = Net(dtype)
    clean = {n: p.detach().clone() for n, p in net.named_parameters()}
    engine = SmoothOut(net, config, kernel="triton")
    assert engine.describe()["kernel"] == "triton"
    taus = []
    for step in range(draws):
        with engine.perturbed(step):
            taus.append({n: (p.detach().float() - clean[n].float()) for n, p in net.named_parameters()})
        for name, p in net.named_parameters():
            assert torch.equal(p.detach(), clean[name]), name  # restored bit-exactly
    return taus, clean, engine


def rows(tensor: torch.Tensor, axis: int) -> torch.Tensor:
    if tensor.ndim <= 1:
        return tensor.reshape(-1, 1)
    return tensor.movedim(axis, 0).reshape(tensor.shape[axis], -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("distribution", ["uniform", "gaussian"])
@pytest.mark.parametrize("law", sorted(NOISE_LAWS))
def test_the_kernel_draws_every_law_exactly(law, distribution, dtype):
    a = 0.05
    config = SmoothOutConfig(strength=a, adapt=law, distribution=distribution, restore="copy", seed=3)
    (tau,), clean, _ = noise_of(config, dtype)
    ulp = 2.0**-23 if dtype == torch.float32 else 2.0**-7  # storing w + tau in the dtype (one ulp: any rounding)
    for sel in select_parameters(Net(dtype), config):  # the row axis each parameter is drawn with
        t, w = tau[sel.name], clean[sel.name].float()
        if w.numel() == 0 or (law != "none" and not bool(w.any())):  # relative laws: zero weights, zero noise
            assert not bool(t.any()), sel.name
            continue
        assert t.abs().max() > 0, sel.name
        slack = (w.abs() + t.abs()) * ulp + 1e-7
        t_rows, w_rows, slack_rows = (rows(x, sel.row_axis) for x in (t, w, slack))
        w_norm = w_rows.norm(dim=1)
        if law == "filter":  # every row's noise has norm a * ||w_row|| (float32 row norms)
            error = (t_rows.norm(dim=1) - a * w_norm).abs()
            assert bool((error <= slack_rows.norm(dim=1) + 1e-5 * a * w_norm).all()), sel.name
        elif law == "filter_std" and distribution == "uniform":  # |tau| <= a ||w_row|| / sqrt(n)
            bound = a * w_norm / math.sqrt(t_rows.shape[1])
            assert bool((t_rows.abs() <= bound[:, None] * (1 + 1e-6) + slack_rows).all()), sel.name
        elif law == "weight" and distribution == "uniform":  # |tau| <= a |w|
            assert bool((t.abs() <= a * w.abs() * (1 + 1e-6) + slack).all()), sel.name
        elif law == "none" and distribution == "uniform":  # the box [-a, a]
            assert bool((t.abs() <= a * (1 + 1e-6) + slack).all()), sel.name


@pytest.mark.parametrize("distribution", ["uniform", "gaussian"])
def test_the_raw_draws_have_the_distributions_moments(distribution):
    from hf_smoothout.kernels._triton_impl import fused_perturb_

    clean = torch.zeros(200, 100)
    noisy = torch.empty_like(clean)
    fused_perturb_(noisy, clean, seed=11, form="constant", gaussian=distribution == "gaussian", strength=1.0,
                   row_axis=0, eps=1e-6)  # fmt: skip
    u = noisy.flatten().double()
    mean, var = float(u.mean()), float(u.var())
    if distribution == "uniform":
        assert float(u.min()) >= -1.0 and float(u.max()) < 1.0
        assert abs(mean) < 0.01 and abs(var - 1 / 3) < 0.01
    else:
        assert abs(mean) < 0.01 and abs(var - 1.0) < 0.03
        assert abs(float(((u - mean) ** 4).mean() / var**2) - 3.0) < 0.15  # kurtosis of a normal


@pytest.mark.parametrize("form", ["constant", "element", "row_norm", "row_length"])
def test_the_noise_does_not_depend_on_the_launch_grid(form):
    """The elements' blocks never change a bit; the row-norm block (fixed by the row length in the engine) changes
    only the summation order of the float32 row norms."""
    from hf_smoothout.kernels._triton_impl import fused_perturb_

    torch.manual_seed(1)
    clean = torch.randn(9, 300)
    outs = []
    for apply_block, row_block in [(1024, 1024), (256, 64)]:
        noisy = torch.empty_like(clean)
        fused_perturb_(noisy, clean, seed=5, form=form, gaussian=False, strength=0.1, row_axis=0, eps=1e-6,
                       apply_block=apply_block, row_block=row_block)  # fmt: skip
        outs.append(noisy)
    same_rows = torch.empty_like(clean)
    fused_perturb_(same_rows, clean, seed=5, form=form, gaussian=False, strength=0.1, row_axis=0, eps=1e-6,
                   apply_block=128, row_block=1024)  # fmt: skip
    assert torch.equal(outs[0], same_rows)
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], rtol=1e-6, atol=1e-7)


def test_the_noise_is_a_function_of_its_key_fresh_per_draw_and_resumable():
    config = SmoothOutConfig(strength=0.05, adapt="filter", restore="copy", seed=3)
    taus, _, _ = noise_of(config, draws=2)
    assert not torch.equal(taus[0]["linear.weight"], taus[1]["linear.weight"])
    net = Net()  # a resumed run: draw 1 from the saved position
    resumed = SmoothOut(net, config, kernel="triton")
    resumed.load_state_dict({"base_seed": 3, "draws": 1})
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    with resumed.perturbed(1):
        assert all(torch.equal(p.detach() - before[n], taus[1][n]) for n, p in net.named_parameters())


@pytest.mark.parametrize("restore", ["copy", "swap"])
def test_a_suspended_window_resumes_the_same_noise_and_restores_exactly(restore):
    net = Net()
    clean = {n: p.detach().clone() for n, p in net.named_parameters()}
    engine = SmoothOut(net, SmoothOutConfig(strength=0.05, restore=restore, seed=3), kernel="triton")
    engine.perturb()
    noisy = {n: p.detach().clone() for n, p in net.named_parameters()}
    engine.suspend()
    assert all(torch.equal(p.detach(), clean[n]) for n, p in net.named_parameters())
    engine.resume()
    assert all(torch.equal(p.detach(), noisy[n]) for n, p in net.named_parameters())
    engine.restore()
    assert all(torch.equal(p.detach(), clean[n]) for n, p in net.named_parameters())


def test_the_kernel_is_opt_in_and_refuses_what_it_cannot_run():
    assert SmoothOut(Net(), SmoothOutConfig()).describe()["kernel"] != "triton"
    with pytest.raises(ValueError, match="writes in place; the kernel needs copy or swap"):
        SmoothOut(Net(), SmoothOutConfig(restore="regenerate"), kernel="triton")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="is on cpu"):
            SmoothOut(Net(), SmoothOutConfig(), kernel="triton")
    assert SmoothOut(Net(), SmoothOutConfig(kernel="triton")).describe()["kernel"] == "triton"


def test_the_kernel_refuses_to_draw_under_cuda_graph_capture(monkeypatch):
    net = Net()
    clean = {n: p.detach().clone() for n, p in net.named_parameters()}
    engine = SmoothOut(net, SmoothOutConfig(strength=0.05, restore="copy"), kernel="triton")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA-graph capture"):
        engine.perturb()
    assert not engine.is_perturbed
    assert all(torch.equal(p.detach(), clean[n]) for n, p in net.named_parameters())


def test_every_registered_law_has_a_fused_form():
    from hf_smoothout.laws.base import FUSED_FORMS

    assert all(law.fused_form in FUSED_FORMS for law in NOISE_LAWS.values())
