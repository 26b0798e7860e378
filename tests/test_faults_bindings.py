"""Faults: replaced storage is re-bound, replaced parameter objects are refused, and two engines never hold noise
in one parameter."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from conftest import assert_params_equal, clone_params

from hf_smoothout import SmoothOut, SmoothOutConfig

pytestmark = pytest.mark.usefixtures("draw_on_workers")
ROOT = Path(__file__).resolve().parents[1]
MAIN_THREAD = threading.main_thread().ident


# ---------------------------------------------------------------------------------------------- 2. replaced storage
@pytest.mark.parametrize("replace", ["data_clone", "half_float"])
def test_replaced_storage_is_rebound(tiny_model, replace):
    engine = SmoothOut(tiny_model, SmoothOutConfig(strength=0.3, seed=0))
    with engine.perturbed():
        pass
    if replace == "data_clone":
        for p in tiny_model.parameters():
            p.data = p.data.clone()
    else:
        tiny_model.half()
        tiny_model.float()
    clean = clone_params(tiny_model)
    with engine.perturbed():
        assert not torch.equal(tiny_model.fc1.weight, clean["fc1.weight"])  # the noise reaches the live weights
    assert_params_equal(tiny_model, clean)  # and is removed from them


def test_optimizer_updates_survive_after_storage_replacement(tiny_model, tiny_data):
    engine = SmoothOut(tiny_model, SmoothOutConfig(strength=0.1, seed=0))
    optimizer = torch.optim.SGD(tiny_model.parameters(), lr=0.5)
    tiny_model.half()
    tiny_model.float()
    batch = {
        "x": torch.stack([d["x"] for d in tiny_data.items]),
        "labels": torch.stack([d["labels"] for d in tiny_data.items]),
    }
    losses = []
    for step in range(20):
        with engine.perturbed(step):
            loss = tiny_model(**batch)["loss"]
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        after_step = clone_params(tiny_model)
        with engine.perturbed(step):
            pass
        assert_params_equal(tiny_model, after_step)  # the update is not overwritten by a stale backup
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05  # training moves (it stalled when restores hit dead tensors)


def test_replaced_parameter_object_is_refused(tiny_model):
    engine = SmoothOut(tiny_model, SmoothOutConfig(strength=0.1, seed=0))
    fresh = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    tiny_model.load_state_dict(fresh, assign=True)
    clean = clone_params(tiny_model)
    with pytest.raises(RuntimeError, match="replaced by a different Parameter"):
        engine.perturb()
    assert not engine.is_perturbed
    assert_params_equal(tiny_model, clean)


# ---------------------------------------------------------------------------------------------- 8. two engines
def test_overlapping_engines_are_refused(tiny_model):
    first = SmoothOut(tiny_model, SmoothOutConfig(strength=0.3, seed=0))
    second = SmoothOut(tiny_model, SmoothOutConfig(strength=0.3, seed=1))
    clean = clone_params(tiny_model)
    first.perturb()
    noisy = clone_params(tiny_model)
    with pytest.raises(RuntimeError, match="already perturbed by another SmoothOut engine"):
        second.perturb()
    assert_params_equal(tiny_model, noisy)  # the refused engine touched nothing
    assert not second.is_perturbed
    first.restore()
    assert_params_equal(tiny_model, clean)
    with second.perturbed():  # free again
        pass
    assert_params_equal(tiny_model, clean)


def test_engines_on_disjoint_parameters_may_overlap(tiny_model):
    head = SmoothOut(tiny_model, SmoothOutConfig(strength=0.3, include=["fc2"], seed=0))
    body = SmoothOut(tiny_model, SmoothOutConfig(strength=0.3, include=["fc1"], seed=1))
    clean = clone_params(tiny_model)
    head.perturb()
    body.perturb()
    head.restore()
    body.restore()
    assert_params_equal(tiny_model, clean)


def test_a_dropped_engine_releases_its_claim(tiny_model):
    engine = SmoothOut(tiny_model, SmoothOutConfig(strength=0.3, seed=0))
    engine.perturb()
    engine.restore()
    other = SmoothOut(tiny_model, SmoothOutConfig(strength=0.3, seed=1))
    engine.perturb()
    del engine  # perturbed and gone: its claim dies with it
    import gc

    gc.collect()
    other.perturb()
    other.restore()
