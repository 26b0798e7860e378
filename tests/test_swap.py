"""``restore="swap"``: the parameters point at a noisy buffer while perturbed and back at their clean tensors after."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_params_equal, clone_params, make_classification_data
from test_trainer import model_with_seed, training_args
from torch import nn

from hf_smoothout import SmoothOut, SmoothOutConfig, SmoothOutTrainer
from hf_smoothout.config import ADAPT_MODES


def stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(50, 40), nn.ReLU(), nn.Linear(40, 3))


@pytest.mark.parametrize("distribution", ["uniform", "gaussian"])
@pytest.mark.parametrize("adapt", ADAPT_MODES)
def test_same_noise_as_copy_and_the_clean_tensors_are_never_written(adapt, distribution):
    seen = {}
    for restore in ("copy", "swap"):
        model = stack()
        clean = clone_params(model)
        tensors = {n: p.data for n, p in model.named_parameters()}
        engine = SmoothOut(model, SmoothOutConfig(strength=0.05, adapt=adapt, distribution=distribution, seed=1,
                                                  restore=restore))  # fmt: skip
        draws = []
        for step in range(3):
            with engine.perturbed(step):
                draws.append({n: p.detach().clone() for n, p in model.named_parameters()})
                moved = [p.data_ptr() != tensors[n].data_ptr() for n, p in model.named_parameters()]
                if restore == "swap":
                    assert all(moved) and all(torch.equal(tensors[n], clean[n]) for n in clean)
                else:
                    assert not any(moved)
            assert all(p.data_ptr() == tensors[n].data_ptr() for n, p in model.named_parameters())
            assert_params_equal(model, clean)
        seen[restore] = draws
    for copy_draw, swap_draw in zip(seen["copy"], seen["swap"], strict=True):
        assert all(torch.equal(copy_draw[n], swap_draw[n]) for n in copy_draw)


@pytest.mark.parametrize(("samples", "accumulation"), [(1, 2), (2, 1)])
def test_training_is_bit_identical_to_copy_restore(tmp_path, samples, accumulation):
    """Optimizer updates land in the clean tensors: swap and copy train the same weights, bit for bit."""
    data = make_classification_data()
    final = {}
    for restore in ("copy", "swap"):
        model = model_with_seed(dropout=0.1)
        cfg = SmoothOutConfig(strength=0.2, samples=samples, restore=restore, seed=5)
        args = training_args(tmp_path / restore, max_steps=6, gradient_accumulation_steps=accumulation)
        SmoothOutTrainer(model, args, train_dataset=data, smoothout_config=cfg).train()
        final[restore] = clone_params(model)
    assert all(torch.equal(final["copy"][n], final["swap"][n]) for n in final["copy"])


def test_swap_needs_denoising():
    with pytest.raises(ValueError, match="restore='swap' needs denoise=True"):
        SmoothOutConfig(restore="swap", denoise=False)


def test_peft_lora_adapters_swap_like_any_parameter():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(stack(), peft.LoraConfig(r=2, target_modules=["0", "2"]))
    clean = clone_params(model)
    engine = SmoothOut(model, SmoothOutConfig(strength=0.1, adapt="none", restore="swap", seed=0))
    assert engine.parameter_names and all("lora_" in n for n in engine.parameter_names)
    with engine.perturbed():
        model(torch.randn(4, 50)).sum().backward()
        assert any(not torch.equal(p, clean[n]) for n, p in model.named_parameters() if "lora_A" in n)
    assert_params_equal(model, clean)
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)
