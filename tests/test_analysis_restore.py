"""Every measurement leaves the model exactly as it was: weights, buffers, modes, requires_grad, gradients and
torch's RNG, also when the loss raises midway (after the weights were moved)."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyClassifier, make_classification_data
from torch import nn
from torch.utils.data import DataLoader

from hf_smoothout.analysis import (
    epsilon_sharpness,
    hessian_top_eigenvalue,
    hessian_trace,
    hessian_vector_product,
    interpolation_landscape,
    random_landscape,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class BatchNormClassifier(TinyClassifier):
    """TinyClassifier with a BatchNorm (running-stat buffers) and a frozen parameter."""

    def __init__(self) -> None:
        super().__init__(dropout=0.2)
        self.bn = nn.BatchNorm1d(6)
        self.scale = nn.Parameter(torch.tensor(1.5), requires_grad=False)

    def forward(self, x, labels=None):
        return super().forward(self.bn(x) * self.scale, labels)


def make_model(seed: int = 0) -> BatchNormClassifier:
    torch.manual_seed(seed)
    model = BatchNormClassifier().train()
    model.norm.eval()  # mixed modes must come back as they were
    model.fc1.bias.requires_grad_(False)
    model.fc2.weight.grad = torch.full_like(model.fc2.weight, 0.25)
    return model


OTHER_MODEL = make_model(seed=1)  # model B of the interpolation, built once (building it seeds the global RNG)
MEASUREMENTS = {
    "epsilon": lambda m, dl, fwd: epsilon_sharpness(m, dl, max_batches=2, forward_fn=fwd, progress=False),
    "epsilon_subspace": lambda m, dl, fwd: epsilon_sharpness(
        m, dl, subspace_dim=3, max_batches=2, forward_fn=fwd, progress=False
    ),
    "hessian_top": lambda m, dl, fwd: hessian_top_eigenvalue(
        m, dl, max_iterations=4, max_batches=2, forward_fn=fwd, progress=False
    ),
    "hessian_trace": lambda m, dl, fwd: hessian_trace(m, dl, samples=3, max_batches=2, forward_fn=fwd, progress=False),
    "hessian_vector_product": lambda m, dl, fwd: hessian_vector_product(
        m, dl, [torch.ones_like(p) for p in m.parameters() if p.requires_grad], max_batches=2, forward_fn=fwd
    ),
    "interpolation": lambda m, dl, fwd: interpolation_landscape(
        m,
        OTHER_MODEL,
        {"train": dl, "validation": dl},
        alphas=[-1.0, 0.5, 2.0],
        max_batches=2,
        forward_fn=fwd,
        progress=False,
    ),
    "random_1d": lambda m, dl, fwd: random_landscape(
        m, dl, alphas=[-1.0, 0.3, 1.0], max_batches=2, forward_fn=fwd, progress=False
    ),
    "random_2d": lambda m, dl, fwd: random_landscape(
        m,
        dl,
        dims=2,
        alphas=[-1.0, 1.0],
        betas=[0.5, 1.0],
        include_one_dim=True,
        max_batches=2,
        forward_fn=fwd,
        progress=False,
    ),
}
FAIL_AT = {"hessian_vector_product": 2}  # one HVP over two batches: two loss evaluations in all
MOVES_WEIGHTS = {"epsilon", "epsilon_subspace", "interpolation", "random_1d", "random_2d"}


class Snapshot:
    def __init__(self, model: nn.Module) -> None:
        self.state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        self.modes = {name: m.training for name, m in model.named_modules()}
        self.flags = {name: p.requires_grad for name, p in model.named_parameters()}
        self.grads = {name: p.grad for name, p in model.named_parameters()}
        self.grad_values = {name: g.clone() for name, g in self.grads.items() if g is not None}
        self.rng = torch.get_rng_state()

    def moved(self, model: nn.Module) -> bool:
        return any(not torch.equal(p.detach(), self.state[n]) for n, p in model.named_parameters())

    def assert_restored(self, model: nn.Module) -> None:
        for name, value in model.state_dict(keep_vars=True).items():
            assert torch.equal(value.detach(), self.state[name]), f"{name} changed"
            assert value.dtype == self.state[name].dtype
        assert {name: m.training for name, m in model.named_modules()} == self.modes
        assert {name: p.requires_grad for name, p in model.named_parameters()} == self.flags
        for name, p in model.named_parameters():
            assert p.grad is self.grads[name], f"{name}.grad replaced"
            if p.grad is not None:
                assert torch.equal(p.grad, self.grad_values[name])
        assert torch.equal(torch.get_rng_state(), self.rng)


def loader() -> DataLoader:
    return DataLoader(make_classification_data(n=32), batch_size=8, shuffle=True)  # shuffling uses the global RNG


@pytest.mark.parametrize("name", sorted(MEASUREMENTS))
def test_model_is_bit_identical_after_a_measurement(name):
    model = make_model()
    snapshot = Snapshot(model)
    calls = []

    def forward(m, batch):
        calls.append(m.training)
        return m(**batch)

    result = MEASUREMENTS[name](model, loader(), forward)
    snapshot.assert_restored(model)
    assert calls and not any(calls)  # every loss evaluation ran in eval mode
    if name.startswith(("epsilon", "hessian_top", "hessian_trace")):
        assert result.value == result.value  # a number, not NaN


@pytest.mark.parametrize("name", sorted(MEASUREMENTS))
def test_model_is_restored_when_the_loss_raises_midway(name):
    model = make_model()
    snapshot = Snapshot(model)
    seen = {"calls": 0, "moved_at_failure": None}

    def failing_forward(m, batch):
        seen["calls"] += 1
        if seen["calls"] == FAIL_AT.get(name, 3):
            seen["moved_at_failure"] = snapshot.moved(m)
            raise RuntimeError("loss failed on purpose")
        return m(**batch)

    with pytest.raises(RuntimeError, match="on purpose"):
        MEASUREMENTS[name](model, loader(), failing_forward)
    assert seen["calls"] == FAIL_AT.get(name, 3)
    if name in MOVES_WEIGHTS:
        assert seen["moved_at_failure"]  # the failure happened while the weights were displaced
    snapshot.assert_restored(model)


def test_interpolation_leaves_both_models_untouched_when_the_model_raises():
    model_a, model_b = make_model(0), make_model(1)
    snap_a, snap_b = Snapshot(model_a), Snapshot(model_b)
    model_a.fail_forward = True
    with pytest.raises(RuntimeError, match="on purpose"):
        interpolation_landscape(model_a, model_b, loader(), alphas=[0.5], progress=False)
    model_a.fail_forward = False
    snap_a.assert_restored(model_a)
    snap_b.assert_restored(model_b)


def test_batchnorm_statistics_are_not_updated():
    model = make_model()
    before = model.bn.running_mean.clone(), int(model.bn.num_batches_tracked)
    epsilon_sharpness(model, loader(), max_batches=2, progress=False)
    assert torch.equal(model.bn.running_mean, before[0]) and int(model.bn.num_batches_tracked) == before[1]
