"""Noise laws of the engine: the box, per-row norms, element-wise bounds, moments, selection."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_params_equal, clone_params
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_smoothout import SmoothOut, SmoothOutConfig
from hf_smoothout.config import RESTORE_MODES, SCHEDULES
from hf_smoothout.noise import UNIFORM_LEVELS


class ZooModel(nn.Module):
    """One of every layer kind whose row axis matters, plus layers that must stay untouched."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(24, 16)
        self.conv = nn.Conv2d(3, 8, kernel_size=3)
        self.conv_t = nn.ConvTranspose2d(4, 6, kernel_size=2)
        self.gpt2_conv1d = Conv1D(12, 10)  # weight stored [in=10, out=12]
        self.embedding = nn.Embedding(30, 7)
        self.batch_norm = nn.BatchNorm1d(16)
        self.layer_norm = nn.LayerNorm(16)
        self.frozen = nn.Linear(5, 5)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(16, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.normal_()  # non-trivial norms everywhere, including the norm layers


# Which dims are reduced to get one norm per output row, per parameter name.
ROW_DIMS = {
    "linear.weight": (1,),
    "conv.weight": (1, 2, 3),
    "conv_t.weight": (0, 2, 3),
    "gpt2_conv1d.weight": (0,),
    "embedding.weight": (1,),
    "head.weight": (1,),
}
UNTOUCHED = [
    "batch_norm.weight",
    "batch_norm.bias",
    "layer_norm.weight",
    "layer_norm.bias",
    "frozen.weight",
    "frozen.bias",
]


def draw(model: nn.Module, config: SmoothOutConfig, step: int = 0, total: int | None = None):
    """One perturb/restore cycle; returns {name: noise (float64)} and asserts the restore."""
    engine = SmoothOut(model, config)
    clean = clone_params(model)
    engine.perturb(step, total)
    noise = {n: p.detach().double() - clean[n].double() for n, p in model.named_parameters()}
    engine.restore()
    if config.restore in ("copy", "swap"):
        assert_params_equal(model, clean)
    else:
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), clean[n], rtol=1e-6, atol=1e-6)
    return noise, clean, engine


@pytest.fixture
def zoo() -> ZooModel:
    torch.manual_seed(0)
    return ZooModel()


@pytest.mark.parametrize("restore", RESTORE_MODES)
@pytest.mark.parametrize("distribution", ["uniform", "gaussian"])
def test_filter_rows_have_noise_norm_a_times_row_norm(zoo, restore, distribution):
    a = 0.05
    noise, clean, _ = draw(
        zoo, SmoothOutConfig(strength=a, adapt="filter", distribution=distribution, restore=restore, seed=1)
    )
    for name, dims in ROW_DIMS.items():
        got = torch.linalg.vector_norm(noise[name], dim=dims)
        want = a * torch.linalg.vector_norm(clean[name].double(), dim=dims)
        torch.testing.assert_close(got, want, rtol=2e-4, atol=0, msg=name)
    # 1-D parameters (biases): each element is a row, so noise = +-a*|p_i| * |u_i| / (|u_i| + 1e-6): the guard
    # against a zero draw shrinks elements with tiny |u_i| (uniform float32 draws have |u_i| >= 2**-16)
    for name in ("linear.bias", "conv.bias", "head.bias"):
        ratio = noise[name].abs() / (a * clean[name].double().abs())
        assert bool((ratio <= 1 + 1e-6).all()), name
        assert float((ratio - 1).abs().median()) < 2e-4, name
        if distribution == "uniform":
            assert bool((ratio >= 1 / (1 + 1e-6 * UNIFORM_LEVELS)).all()), name
    for name in UNTOUCHED:
        assert torch.count_nonzero(noise[name]) == 0, name


@pytest.mark.parametrize("restore", RESTORE_MODES)
def test_filter_std_rows_scale_the_raw_draw_by_the_row_rms(zoo, restore):
    """filter_std: tau = a * ||w_row|| / sqrt(n) * u, so tau / (a * rms(w_row)) is the raw U(-1, 1) draw."""
    a = 0.05
    noise, clean, _ = draw(zoo, SmoothOutConfig(strength=a, adapt="filter_std", restore=restore, seed=2))
    for name, dims in ROW_DIMS.items():
        weight = clean[name].double()
        n = weight.numel() // weight.shape[next(d for d in range(weight.ndim) if d not in dims)]
        rms = torch.linalg.vector_norm(weight, dim=dims, keepdim=True) / n**0.5
        u = noise[name] / (a * rms)
        assert float(u.abs().max()) <= 1 + 1e-4 and float(u.abs().max()) > 0.5, name
        if weight.numel() >= 200:  # uniform: E u^2 = 1/3
            assert abs(float(u.pow(2).mean()) - 1 / 3) < 0.05, name
    for name in UNTOUCHED:
        assert torch.count_nonzero(noise[name]) == 0, name


def test_conv1d_rows_are_output_columns(zoo):
    """For GPT-2's Conv1D ([in, out]) the row-wise law must hold per column, not per stored row."""
    a = 0.05
    noise, clean, _ = draw(zoo, SmoothOutConfig(strength=a, adapt="filter", seed=3))
    per_stored_row = noise["gpt2_conv1d.weight"].norm(dim=1)
    wrong_axis = a * clean["gpt2_conv1d.weight"].double().norm(dim=1)
    assert not torch.allclose(per_stored_row, wrong_axis, rtol=1e-2)


@pytest.mark.parametrize("restore", RESTORE_MODES)
def test_uniform_box(zoo, restore):
    a = 0.03
    noise, _, _ = draw(zoo, SmoothOutConfig(strength=a, adapt="none", restore=restore, seed=2))
    tol = 1e-6  # rounding of w + tau in fp32
    for name in ROW_DIMS:
        n = noise[name]
        assert n.abs().max() <= a + tol, name
    everything = torch.cat([noise[n].flatten() for n in ROW_DIMS])
    assert everything.abs().max() > 0.9 * a  # fills the box
    assert everything.mean().abs() < 0.1 * a


@pytest.mark.parametrize("restore", RESTORE_MODES)
def test_weight_mode_bounded_by_a_abs_w(zoo, restore):
    a = 0.2
    noise, clean, _ = draw(zoo, SmoothOutConfig(strength=a, adapt="weight", restore=restore, seed=4))
    for name in ROW_DIMS:
        bound = a * clean[name].double().abs() * (1 + 1e-5) + 1e-7
        assert torch.all(noise[name].abs() <= bound), name
        ratio = noise[name] / clean[name].double()
        assert ratio.abs().max() > 0.8 * a


@pytest.mark.parametrize(("distribution", "variance", "kurtosis"), [("uniform", 1 / 3, 1.8), ("gaussian", 1.0, 3.0)])
def test_moments(distribution, variance, kurtosis):
    torch.manual_seed(0)
    model = nn.Linear(400, 500, bias=False)
    a = 0.1
    noise, _, _ = draw(model, SmoothOutConfig(strength=a, adapt="none", distribution=distribution, seed=5))
    x = noise["weight"].flatten() / a
    assert abs(x.mean()) < 0.01
    assert x.var().item() == pytest.approx(variance, rel=0.02)
    assert ((x - x.mean()) ** 4).mean().item() / x.var().item() ** 2 == pytest.approx(kurtosis, rel=0.03)


def test_selection_rules(zoo):
    cfg = SmoothOutConfig(strength=0.1, exclude=["^head"], skip_bias=True, seed=0)
    noise, _, engine = draw(zoo, cfg)
    assert set(engine.parameter_names) == {
        "linear.weight",
        "conv.weight",
        "conv_t.weight",
        "gpt2_conv1d.weight",
        "embedding.weight",
    }
    for name in ["head.weight", "head.bias", "linear.bias", *UNTOUCHED]:
        assert torch.count_nonzero(noise[name]) == 0, name


def test_norm_layers_included_when_asked(zoo):
    engine = SmoothOut(zoo, SmoothOutConfig(skip_norm_layers=False))
    assert "layer_norm.weight" in engine.parameter_names and "batch_norm.bias" in engine.parameter_names
    assert "frozen.weight" not in engine.parameter_names


def test_tied_weights_perturbed_once():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    engine = SmoothOut(model, SmoothOutConfig(strength=0.1, adapt="none", seed=0))
    assert engine.parameter_names == ["0.weight"]
    clean = model[0].weight.detach().clone()
    with engine.perturbed():
        assert (model[0].weight - clean).abs().max() <= 0.1 + 1e-6
    assert torch.equal(model[0].weight, clean)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_scales_the_noise(schedule):
    torch.manual_seed(0)
    model = nn.Linear(50, 40)
    cfg = SmoothOutConfig(strength=0.1, adapt="filter", schedule=schedule, seed=0)
    step, total = 7, 20
    noise, clean, engine = draw(model, cfg, step, total)
    expected = engine.strength_at(step, total)
    assert engine.current_strength == expected
    torch.testing.assert_close(
        noise["weight"].norm(dim=1), expected * clean["weight"].double().norm(dim=1), rtol=2e-4, atol=0
    )


def test_zero_strength_touches_nothing(zoo):
    noise, _, engine = draw(zoo, SmoothOutConfig(strength=0.0))
    assert all(torch.count_nonzero(n) == 0 for n in noise.values())
    assert engine.buffer_bytes == 0


def test_the_stream_id_ranges_never_overlap_and_refuse_indices_outside_them():
    import itertools

    from hf_smoothout.seeding import ENGINE_STREAMS, STREAM_RANGES

    spans = sorted((r.start, r.start + r.size, r.name) for r in STREAM_RANGES)
    for (_, end, name), (start, _, other) in itertools.pairwise(spans):
        assert end <= start, f"{name} overlaps {other}"
    assert spans[0][0] == 0 and spans[-1][1] <= 2**63
    with pytest.raises(ValueError, match="outside the 'engine' range"):
        ENGINE_STREAMS.id(ENGINE_STREAMS.size)
