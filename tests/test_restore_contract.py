"""Contract of the restore strategies: every registered strategy closes the window with clean weights, and a
suspended window comes back with exactly its noise.

Each strategy of `hf_smoothout.restore.RESTORE_STRATEGIES` runs through the public engine on every law; exact
strategies must give the weights back bit for bit, the others up to rounding. The strategy chosen by
``restore="auto"`` must be one of them.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_smoothout import SmoothOut, SmoothOutConfig
from hf_smoothout.laws import NOISE_LAWS
from hf_smoothout.restore import RESTORE_STRATEGIES, get_restore_strategy


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 12), nn.LayerNorm(12), nn.Linear(12, 3))


def snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def assert_clean(net: nn.Module, clean: dict[str, torch.Tensor], exact: bool) -> None:
    for name, p in net.named_parameters():
        if exact:
            assert torch.equal(p.detach(), clean[name]), name
        else:
            torch.testing.assert_close(p.detach(), clean[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("law", sorted(NOISE_LAWS))
@pytest.mark.parametrize("restore", sorted(RESTORE_STRATEGIES))
def test_every_restore_closes_the_window_with_clean_weights(restore, law):
    net = model()
    clean = snapshot(net)
    engine = SmoothOut(net, SmoothOutConfig(strength=0.05, adapt=law, restore=restore, seed=3))
    exact = RESTORE_STRATEGIES[restore].exact
    assert engine.restore_mode == restore and engine.describe()["restore"] == restore
    for step in range(3):
        with engine.perturbed(step):
            assert engine.is_noisy and not torch.equal(net[0].weight, clean["0.weight"])
        assert_clean(net, clean, exact)
    assert engine.state_dict()["draws"] == 3


@pytest.mark.parametrize("restore", sorted(RESTORE_STRATEGIES))
def test_every_restore_suspends_to_clean_weights_and_resumes_the_same_noise(restore):
    net = model()
    clean = snapshot(net)
    engine = SmoothOut(net, SmoothOutConfig(strength=0.05, restore=restore, seed=3))
    exact = RESTORE_STRATEGIES[restore].exact
    engine.perturb()
    noisy = snapshot(net)
    for _ in range(2):
        engine.suspend()
        assert engine.is_perturbed and not engine.is_noisy
        assert_clean(net, clean, exact)
        engine.resume()
        assert_clean(net, noisy, exact)
    engine.restore()
    assert_clean(net, clean, exact)


@pytest.mark.parametrize("restore", sorted(RESTORE_STRATEGIES))
def test_buffers_grow_with_the_weights_exactly_when_the_strategy_declares_a_second_buffer(restore):
    config = SmoothOutConfig(strength=0.05, adapt="none", restore=restore, prefetch="never")
    small = SmoothOut(model(), config)
    large = SmoothOut(nn.Sequential(model(), nn.Linear(256, 256)), config)
    extra = (256 * 256 + 256) * 4
    if get_restore_strategy(restore).second_buffer:
        assert small.buffer_bytes == sum(p.numel() * p.element_size() for p in small.parameters)
        assert large.buffer_bytes - small.buffer_bytes == extra
    else:
        assert large.buffer_bytes == small.buffer_bytes  # a scratch of a few rows per worker, whatever the model


def test_auto_resolves_to_a_registered_exact_strategy():
    engine = SmoothOut(model(), SmoothOutConfig(restore="auto"))
    assert engine.restore_mode in RESTORE_STRATEGIES and RESTORE_STRATEGIES[engine.restore_mode].exact


def test_no_denoising_keeps_the_noise_whatever_the_restore():
    net = model()
    clean = snapshot(net)
    engine = SmoothOut(net, SmoothOutConfig(strength=0.05, denoise=False, seed=3))
    with engine.perturbed():
        noisy = snapshot(net)
    assert all(torch.equal(p.detach(), noisy[n]) for n, p in net.named_parameters())
    assert not torch.equal(noisy["0.weight"], clean["0.weight"])
