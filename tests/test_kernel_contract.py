"""Contract of the draw-and-apply kernels: every registered kernel draws the same noise for the same key.

Each kernel of `hf_smoothout.kernels.KERNELS` that draws the reference numbers is run, through the public engine
(``SmoothOut(..., kernel=name)``), on every law x distribution x dtype, against the ``threads`` kernel (the general
path) as reference. Kernels that keep the clean weights aside must match it bit for bit; in-place kernels write
``w + tau`` into the weights themselves and match it up to rounding, and must remove their noise again. Kernels with
numbers of their own (the fused Triton kernel) are checked against the law in their own suite
(``tests/test_triton_kernel.py``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_smoothout import SmoothOut, SmoothOutConfig
from hf_smoothout.kernels import KERNELS
from hf_smoothout.laws import NOISE_LAWS


def model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), nn.LayerNorm(16), nn.Conv1d(16, 8, 3), nn.Embedding(9, 5))
    return net.to(dtype)


def noisy_weights(name: str, law: str, distribution: str, dtype: torch.dtype, draws: int = 2):
    """The noisy weights of ``draws`` consecutive draws with kernel ``name`` (and the clean weights after)."""
    restore = "regenerate" if KERNELS[name].in_place else "copy"
    net = model(dtype)
    config = SmoothOutConfig(strength=0.05, adapt=law, distribution=distribution, restore=restore, seed=7)
    engine = SmoothOut(net, config, kernel=name)
    assert engine.describe()["kernel"] == name
    seen = []
    for step in range(draws):
        with engine.perturbed(step):
            seen.append({n: p.detach().clone() for n, p in net.named_parameters()})
    return seen, {n: p.detach().clone() for n, p in net.named_parameters()}, model(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("distribution", ["uniform", "gaussian"])
@pytest.mark.parametrize("law", sorted(NOISE_LAWS))
@pytest.mark.parametrize("name", [name for name, kernel in KERNELS.items() if kernel.reference_numbers])
def test_every_kernel_draws_the_reference_noise_and_removes_it(name, law, distribution, dtype):
    got, after, clean = noisy_weights(name, law, distribution, dtype)
    reference, _, _ = noisy_weights("threads", law, distribution, dtype)
    for draw, (ours, theirs) in enumerate(zip(got, reference, strict=True)):
        for param, value in ours.items():
            if KERNELS[name].in_place:
                torch.testing.assert_close(value, theirs[param], rtol=1e-6, atol=1e-7, msg=f"{param}, draw {draw}")
            else:
                assert torch.equal(value, theirs[param]), f"{param}, draw {draw}"
    assert not torch.equal(got[0]["0.weight"], got[1]["0.weight"])  # a fresh draw per window
    for param, value in after.items():
        if KERNELS[name].in_place:  # regenerate: the same noise drawn again and subtracted
            torch.testing.assert_close(value, dict(clean.named_parameters())[param].detach(), rtol=0, atol=1e-6)
        else:
            assert torch.equal(value, dict(clean.named_parameters())[param].detach()), param


@pytest.mark.parametrize("name", list(KERNELS))
def test_a_kernel_that_cannot_run_the_setup_is_refused_with_the_reason(name):
    restore = "copy" if KERNELS[name].in_place else "regenerate"  # the other family
    if name == "threads":
        restore = "regenerate"
    with pytest.raises(ValueError, match=f"the {name!r} kernel cannot run restore="):
        SmoothOut(nn.Linear(3, 3), SmoothOutConfig(restore=restore), kernel=name)


def test_an_unknown_kernel_names_the_registered_ones():
    with pytest.raises(ValueError, match="registered: inline, threads, chunked, triton"):
        SmoothOut(nn.Linear(3, 3), SmoothOutConfig(), kernel="fused")


@pytest.mark.usefixtures("draw_on_workers")
def test_worker_threads_draw_what_one_thread_draws():
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(1024, 700), nn.Linear(700, 1024)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    engines = [
        SmoothOut(nets[0], SmoothOutConfig(strength=0.05, seed=1), num_threads=1),
        SmoothOut(nets[1], SmoothOutConfig(strength=0.05, seed=1), num_threads=2, kernel="threads"),
    ]
    assert [e.describe()["kernel"] for e in engines] == ["inline", "threads"]
    assert engines[1].describe()["workers"] == 2
    for engine in engines:
        engine.perturb()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert torch.equal(a, b)
    for engine in engines:
        engine.restore()
        engine.close()


def test_the_config_accepts_every_registered_kernel():
    from hf_smoothout.config import KERNEL_MODES

    assert set(KERNEL_MODES) == {"auto", *KERNELS}


def test_auto_never_chooses_a_kernel_with_numbers_of_its_own():
    assert all(kernel.reference_numbers for kernel in KERNELS.values() if kernel.automatic)
