"""The contract every registered noise law meets (``hf_smoothout.laws.NOISE_LAWS``), run against all of them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_smoothout import SmoothOut, SmoothOutConfig
from hf_smoothout.laws import NOISE_LAWS, get_noise_law, list_noise_laws
from hf_smoothout.noise import draw_, row_norm_buffers

LAWS = list_noise_laws()


def sample(dtype: torch.dtype = torch.float32, shape: tuple[int, ...] = (24, 40)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    draw = draw_(torch.empty(shape, dtype=dtype), "uniform", torch.Generator().manual_seed(1))
    return weight, draw


def apply(law, out: torch.Tensor, base: torch.Tensor, draw: torch.Tensor, strength: float = 0.05):
    """``law.apply_`` along rows (axis 0), with per-row buffers where the law needs them; returns its result."""
    buffers = row_norm_buffers(base, 0) if law.row_scaled else None
    return law.apply_(out, base, draw, strength, row_axis=0, buffers=buffers)


@pytest.mark.parametrize("name", LAWS)
def test_zero_strength_leaves_the_weights_bit_identical(name):
    law = get_noise_law(name)
    weight, draw = sample()
    out = torch.empty_like(weight)
    apply(law, out, weight, draw, 0.0)
    assert torch.equal(out, weight)


@pytest.mark.parametrize("name", LAWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_remove_undoes_apply_up_to_rounding(name, dtype):
    law = get_noise_law(name)
    weight, draw = sample(dtype)
    noisy = weight.clone()
    scale = apply(law, noisy, weight.clone(), draw)
    assert not torch.equal(noisy, weight)
    law.remove_(noisy, draw.clone(), 0.05, row_scale=scale)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(noisy, weight, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("name", LAWS)
def test_writing_into_the_draw_or_the_weight_gives_the_same_values(name):
    law = get_noise_law(name)
    weight, draw = sample()
    separate = torch.empty_like(weight)
    apply(law, separate, weight, draw)
    into_draw = draw.clone()
    apply(law, into_draw, weight, into_draw)
    into_weight = weight.clone()
    apply(law, into_weight, into_weight, draw)
    assert torch.equal(into_draw, separate) and torch.equal(into_weight, separate)


@pytest.mark.parametrize("name", LAWS)
def test_the_declared_typical_relative_size_matches_a_measurement(name):
    law = get_noise_law(name)
    weight, draw = sample(torch.float32, (64, 256))
    out = torch.empty_like(weight)
    apply(law, out, weight, draw)
    measured = float(((out - weight).abs() / weight.abs()).median())
    declared = law.typical_relative(0.05, "uniform", [weight])
    assert declared / 3 < measured < declared * 3, (measured, declared)


@pytest.mark.parametrize("name", LAWS)
def test_row_scaled_laws_scale_many_tensors_like_one(name):
    law = get_noise_law(name)
    if not law.row_scaled:
        pytest.skip("not a per-row law")
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(7, 5, generator=g), torch.randn(4, 3, 2, 2, generator=g), torch.randn(6, generator=g)]
    draws = [torch.rand(w.shape, generator=g) * 2 - 1 for w in weights]
    axes = [0, 1, 0]  # a linear's rows, a conv-transpose-like axis 1, a 1-D parameter's elements
    grouped = law.row_scales_(
        weights, draws, 0.03, axes, [row_norm_buffers(w, a) for w, a in zip(weights, axes, strict=True)]
    )
    for weight, draw, axis, scale in zip(weights, draws, axes, grouped, strict=True):
        assert torch.equal(scale, law.row_scale_(weight, draw, 0.03, axis, row_norm_buffers(weight, axis)))


@pytest.mark.parametrize("name", LAWS)
@pytest.mark.parametrize("restore", ["copy", "swap", "regenerate"])
def test_every_law_runs_in_the_engine_with_every_restore(name, restore):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3))
    clean = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = SmoothOut(model, SmoothOutConfig(strength=0.05, adapt=name, restore=restore, seed=0))
    with engine.perturbed():
        assert any(not torch.equal(p, clean[n]) for n, p in model.named_parameters())
        model(torch.randn(2, 6)).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), clean[n], rtol=0, atol=0 if restore != "regenerate" else 1e-6)


@pytest.mark.parametrize("name", LAWS)
def test_every_law_runs_in_the_merged_space_and_never_writes_the_base(name):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(nn.Sequential(nn.Linear(6, 8)), peft.LoraConfig(r=2, target_modules=["0"]))
    base = model.base_model.model[0].base_layer.weight
    clean = base.detach().clone()
    engine = SmoothOut(model, SmoothOutConfig(strength=0.05, adapt=name, space="lora_merged", seed=0))
    with engine.perturbed():
        noisy = engine.merged_space.noisy_weights()["base_model.model.0"]
        model(torch.randn(2, 6)).sum().backward()
    assert not torch.equal(noisy, clean) and torch.equal(base, clean)


def test_the_config_and_the_command_line_accept_exactly_the_registered_laws():
    from transformers import HfArgumentParser

    from hf_smoothout import SmoothOutTrainingArguments

    for name in NOISE_LAWS:
        SmoothOutConfig(adapt=name)
    with pytest.raises(ValueError, match="adapt"):
        SmoothOutConfig(adapt="not-a-law")
    parser = HfArgumentParser(SmoothOutTrainingArguments)
    action = next(a for a in parser._actions if "--smoothout_adapt" in a.option_strings)
    assert sorted(action.choices) == LAWS
