"""Drawing ahead on a background thread (``prefetch``) gives exactly the noise of a synchronous draw."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import TinyClassifier, assert_params_equal, clone_params

import hf_smoothout.kernels.prefetched as prefetched_module
import hf_smoothout.noise as noise_module
from hf_smoothout import SmoothOut, SmoothOutConfig
from hf_smoothout.noise import UNIFORM_LEVELS, draw_


def model() -> TinyClassifier:
    torch.manual_seed(0)
    return TinyClassifier(dim=40, hidden=64)


def noise_sequence(config: SmoothOutConfig, draws: int = 5) -> list[dict[str, torch.Tensor]]:
    net = model()
    engine = SmoothOut(net, config)
    clean = clone_params(net)
    seen = []
    for step in range(draws):
        with engine.perturbed(step):
            seen.append({n: p.detach() - clean[n] for n, p in net.named_parameters()})
        assert_params_equal(net, clean)
    engine.close()
    return seen


@pytest.mark.parametrize("distribution", ["uniform", "gaussian"])
@pytest.mark.parametrize("adapt", ["filter", "none"])
def test_prefetched_noise_equals_synchronous_noise(distribution, adapt):
    common = dict(strength=0.05, adapt=adapt, distribution=distribution, seed=3)
    ahead = noise_sequence(SmoothOutConfig(**common, prefetch="always"))
    sync = noise_sequence(SmoothOutConfig(**common, prefetch="never"))
    for a, b in zip(ahead, sync, strict=True):
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(ahead[0]["fc1.weight"], ahead[1]["fc1.weight"])


def test_prefetch_memory_and_auto_rule(monkeypatch):
    net = model()
    params = sum(p.numel() * p.element_size() for p in net.parameters())
    always = SmoothOut(net, SmoothOutConfig(prefetch="always"))
    never = SmoothOut(net, SmoothOutConfig(prefetch="never"))
    assert always.buffer_bytes - never.buffer_bytes == params - sum(
        p.numel() * p.element_size() for n, p in net.named_parameters() if "norm" in n
    )
    monkeypatch.setattr(prefetched_module, "available_cores", lambda: torch.get_num_threads())
    assert SmoothOut(net, SmoothOutConfig()).buffer_bytes == never.buffer_bytes  # every core busy: off
    monkeypatch.setattr(prefetched_module, "available_cores", lambda: torch.get_num_threads() + 1)
    assert SmoothOut(net, SmoothOutConfig()).buffer_bytes == always.buffer_bytes
    regenerate = {
        mode: SmoothOut(net, SmoothOutConfig(restore="regenerate", prefetch=mode)) for mode in ("always", "never")
    }
    assert regenerate["always"].buffer_bytes == regenerate["never"].buffer_bytes  # no backup: nothing to draw ahead


def test_resumed_position_and_a_failed_fill_fall_back_to_a_synchronous_draw(monkeypatch):
    reference = noise_sequence(SmoothOutConfig(strength=0.05, seed=3, prefetch="never"), draws=7)
    net = model()
    clean = clone_params(net)
    engine = SmoothOut(net, SmoothOutConfig(strength=0.05, seed=3, prefetch="always"))
    with engine.perturbed():
        pass  # prefetches draw 1
    engine.load_state_dict({"base_seed": 3, "draws": 4})  # the prefetched draw is not the one needed now
    with engine.perturbed(4):
        got = {n: p.detach() - clean[n] for n, p in net.named_parameters()}
    assert all(torch.equal(got[n], reference[4][n]) for n in got)

    real = noise_module.draw_
    calls = {"n": 0, "failed": 0}

    def fails_once_in_the_background(*args, **kwargs):
        calls["n"] += 1
        if threading.current_thread() is not threading.main_thread() and not calls["failed"]:
            calls["failed"] += 1
            raise MemoryError("simulated failure on the background thread")
        return real(*args, **kwargs)

    monkeypatch.setattr(noise_module, "draw_", fails_once_in_the_background)
    with engine.perturbed(5):  # draw 5 was prefetched (before the patch); draw 6 is prefetched now, and fails
        pass
    calls["n"] = 0
    with engine.perturbed(6):
        got = {n: p.detach() - clean[n] for n, p in net.named_parameters()}
    assert calls["failed"] == 1 and calls["n"] > 0  # the fill failed; draw 6 was drawn again in this thread
    assert all(torch.equal(got[n], reference[6][n]) for n in got)
    assert_params_equal(net, clean)


def test_uniform_float32_noise_is_on_16_bit_levels_and_prefix_stable():
    long = draw_(torch.empty(700_001), "uniform", np.random.Generator(np.random.PCG64(1)))
    short = draw_(torch.empty(300_003), "uniform", np.random.Generator(np.random.PCG64(1)))
    assert torch.equal(long[:300_003], short)  # a pure function of the seed and the position
    levels = (long.double() + 1.0) * UNIFORM_LEVELS / 2 - 0.5
    assert torch.equal(levels, levels.round()) and float(levels.min()) >= 0 and float(levels.max()) < UNIFORM_LEVELS
    assert float(long.abs().max()) < 1.0 and abs(float(long.mean())) < 3e-3
    assert abs(float(long.double().pow(2).mean()) - 1 / 3) < 3e-3
