"""Sharpness measures against closed forms: quadratics and quartics with known Hessians, and a small network
whose full Hessian is computed densely."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import TinyClassifier, make_classification_data
from torch import nn
from torch.utils.data import DataLoader

from hf_smoothout.analysis import (
    MEASURES,
    RandomSubspace,
    SharpnessOptions,
    epsilon_sharpness,
    hessian_top_eigenvalue,
    hessian_trace,
    hessian_vector_product,
    measure_sharpness,
)

BATCHES = [{"labels": torch.zeros(4)}]  # the closed-form models ignore their inputs


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny problems on a shared 2-core machine run far faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Quadratic(nn.Module):
    """``loss = 0.5 * (w - c)^T H (w - c)`` over the flattened weight; batches ignored."""

    def __init__(self, hessian: torch.Tensor, start: torch.Tensor, center: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(start.clone().double())
        self.register_buffer("hessian", hessian.double())
        self.register_buffer("center", (start if center is None else center).clone().double())

    def forward(self, **batch):
        d = (self.weight - self.center).reshape(-1)
        return {"loss": 0.5 * d @ self.hessian @ d}


class Quartic(nn.Module):
    """``loss = 0.25 * sum(k * w^4)``: Hessian ``diag(3 k w^2)``."""

    def __init__(self, k: torch.Tensor, start: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(start.clone().double())
        self.register_buffer("k", k.double())

    def forward(self, **batch):
        return {"loss": 0.25 * (self.k * self.weight**4).sum()}


def random_spd(n: int, eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(eigenvalues.double()) @ q.T


def randn(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --------------------------------------------------------------------------- epsilon-sharpness
def box_maximum_sharpness(h: torch.Tensor, x0: torch.Tensor, c: torch.Tensor, eps: float) -> float:
    """Analytic Keskar sharpness of 0.5 * sum(h (x - c)^2): the maximum is at the corner farthest from c."""
    radius = eps * (x0.abs() + 1.0)
    f0 = 0.5 * (h * (x0 - c) ** 2).sum()
    f_max = 0.5 * (h * ((x0 - c).abs() + radius) ** 2).sum()
    return float(100.0 * (f_max - f0) / (1.0 + f0))


@pytest.mark.parametrize("eps", [5e-4, 1e-2])
@pytest.mark.parametrize(
    "case, iterations, rel",
    [
        ("at_minimum", 10, 1e-2),  # 10 L-BFGS-B iterations reach the corner to within 1 %
        ("at_minimum", 40, 1e-9),  # more iterations: exact
        ("off_minimum", 10, 1e-9),
    ],
)
def test_epsilon_sharpness_matches_the_box_corner(eps, case, iterations, rel):
    n = 30
    h = torch.logspace(-1, 1, n, dtype=torch.float64)  # condition number 100
    center = randn(n, seed=1)
    x0 = center.clone() if case == "at_minimum" else center + randn(n, seed=2, scale=0.05)
    # At an exact minimum the gradient vanishes: only a random start moves (the default); off the minimum, the
    # search started at x0 climbs to the far corner, the global maximum.
    model = Quadratic(torch.diag(h), x0, center)
    result = epsilon_sharpness(
        model, BATCHES, epsilon=eps, max_iterations=iterations, repeats=3, random_start=case == "at_minimum",
        progress=False,
    )  # fmt: skip
    expected = box_maximum_sharpness(h, x0, center, eps)
    assert result.loss == pytest.approx(float(0.5 * (h * (x0 - center) ** 2).sum()), rel=1e-12, abs=1e-15)
    assert result.values == pytest.approx([expected] * 3, rel=rel)
    assert all(v <= expected * (1 + 1e-12) for v in result.values)  # never above the true maximum
    assert result.value == pytest.approx(sum(result.values) / 3, rel=1e-12)
    assert result.num_parameters == n and result.repeats == 3


def test_epsilon_sharpness_at_a_stationary_point_without_random_start_is_zero():
    model = Quadratic(torch.eye(5), randn(5, seed=0))
    result = epsilon_sharpness(model, BATCHES, random_start=False, progress=False)
    assert result.value == 0.0 and result.loss == 0.0


def test_epsilon_subspace_of_dimension_one_is_the_interval_end():
    """x0 at the minimum, M = 1: f(y) = 0.5 (a^T H a) y^2 on |y| <= eps (|A^+ x0| + 1), maximal at both ends."""
    n, eps = 12, 1e-2
    hessian = random_spd(n, torch.linspace(0.5, 8.0, n))
    x0 = randn(n, seed=3)
    result = epsilon_sharpness(Quadratic(hessian, x0), BATCHES, epsilon=eps, subspace_dim=1, repeats=4, progress=False)
    for repeat, value in enumerate(result.values):
        a = RandomSubspace(n, 1, seed=repeat).dense()[:, 0]
        radius = eps * (abs(float(a @ x0)) / float(a @ a) + 1.0)
        expected = 100.0 * 0.5 * float(a @ hessian @ a) * radius**2
        assert value == pytest.approx(expected, rel=1e-9)
    assert len(set(result.values)) == 4  # a different subspace per repeat
    assert result.subspace_dim == 1


@pytest.mark.parametrize("dim", [2, 3, 4])
def test_epsilon_subspace_ends_at_a_vertex_of_the_y_box(dim):
    """f is convex in y, so its local maxima over the y-box are vertices: every run ends on one, and never above
    the best vertex (enumerated by hand)."""
    n, eps = 12, 1e-2
    hessian = random_spd(n, torch.linspace(0.5, 8.0, n))
    center = randn(n, seed=4)
    result = epsilon_sharpness(
        Quadratic(hessian, center), BATCHES, epsilon=eps, subspace_dim=dim, repeats=3, seed=10, progress=False
    )
    for repeat, f_max in enumerate(result.max_losses):
        a = RandomSubspace(n, dim, seed=10 + repeat).dense()
        radius = eps * ((torch.linalg.pinv(a) @ center).abs() + 1.0)
        vertices = []
        for signs in itertools.product([-1.0, 1.0], repeat=dim):
            step = a @ (radius * torch.tensor(signs, dtype=torch.float64))
            vertices.append(float(0.5 * step @ hessian @ step))
        assert min(abs(f_max - v) / v for v in vertices) < 1e-9
        assert f_max <= max(vertices) * (1 + 1e-12)


def test_random_subspace_blocks_agree_with_dense_matrix():
    subspace = RandomSubspace(70_000, 2, seed=5)  # two row blocks
    dense = subspace.dense()
    x = randn(70_000, seed=6)
    y = randn(2, seed=7)
    assert torch.allclose(subspace.matvec(y), dense @ y, rtol=1e-12, atol=1e-12)
    assert torch.allclose(subspace.rmatvec(x), dense.T @ x, rtol=1e-10)
    assert torch.allclose(subspace.pinv_apply(x), torch.linalg.pinv(dense) @ x, rtol=1e-8)
    assert torch.equal(RandomSubspace(70_000, 2, seed=5).dense(), dense)  # reproducible from the seed


# --------------------------------------------------------------------------- Hessian
@pytest.mark.parametrize("problem", ["dense_quadratic", "quartic"])
def test_hessian_top_eigenvalue_closed_form(problem):
    n = 10
    if problem == "dense_quadratic":
        eigenvalues = torch.tensor([10.0, 6.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.5, 0.2, 0.1])
        model, expected = Quadratic(random_spd(n, eigenvalues), randn(n, seed=0)), 10.0
    else:
        k, w = torch.linspace(1.0, 2.0, n), torch.linspace(-1.0, 1.5, n)
        model, expected = Quartic(k, w), float((3 * k * w**2).max())
    result = hessian_top_eigenvalue(model, BATCHES, max_iterations=300, tolerance=1e-13, progress=False)
    assert result.value == pytest.approx(expected, rel=1e-8)
    assert result.converged and result.iterations < 300


def test_hutchinson_trace_is_exact_for_a_diagonal_hessian():
    h = torch.linspace(0.1, 5.0, 20, dtype=torch.float64)
    result = hessian_trace(Quadratic(torch.diag(h), randn(20, seed=0)), BATCHES, samples=3, progress=False)
    assert result.value == pytest.approx(float(h.sum()), rel=1e-12)
    assert result.std == pytest.approx(0.0, abs=1e-10)


def test_hutchinson_trace_of_a_dense_hessian_within_its_standard_error():
    n, samples = 12, 400
    hessian = random_spd(n, torch.linspace(0.5, 6.0, n), seed=3)
    result = hessian_trace(Quadratic(hessian, randn(n, seed=0)), BATCHES, samples=samples, seed=1, progress=False)
    # Var(z^T H z) = 2 * sum_{i != j} H_ij^2 for Rademacher z
    variance = 2.0 * float((hessian**2).sum() - (torch.diagonal(hessian) ** 2).sum())
    stderr = math.sqrt(variance / samples)
    assert abs(result.value - float(torch.trace(hessian))) < 4 * stderr
    assert result.stderr == pytest.approx(stderr, rel=0.25)


def network_and_dense_hessian(max_batches: int = 2):
    torch.manual_seed(0)
    model = TinyClassifier(dim=4, hidden=5, classes=3).double()
    data = make_classification_data(n=40, dim=4, classes=3, seed=1)
    for item in data.items:
        item["x"] = item["x"].double()
    loader = DataLoader(data, batch_size=16)  # batches of 16, 16, 8
    batches = list(loader)[:max_batches]
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    total = sum(len(b["labels"]) for b in batches)

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        params = {n: t.view(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes, strict=True)}
        return sum(len(b["labels"]) / total * torch.func.functional_call(model, params, (), b)["loss"] for b in batches)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return model, loader, torch.autograd.functional.hessian(loss_of, flat)


def test_hessian_vector_product_of_a_network_matches_the_dense_hessian():
    model, loader, dense = network_and_dense_hessian()
    v = randn(dense.shape[0], seed=8)
    parts = torch.split(v, [p.numel() for p in model.parameters()])
    hv = hessian_vector_product(
        model, loader, [t.view(p.shape) for t, p in zip(parts, model.parameters(), strict=True)], max_batches=2
    )
    assert torch.allclose(torch.cat([t.reshape(-1) for t in hv]), dense @ v, rtol=1e-9, atol=1e-12)


def test_hessian_measures_of_a_network_match_its_dense_spectrum():
    model, loader, dense = network_and_dense_hessian()
    eigenvalues = torch.linalg.eigvalsh(dense)
    top = eigenvalues[eigenvalues.abs().argmax()]
    result = hessian_top_eigenvalue(model, loader, max_batches=2, max_iterations=500, tolerance=1e-12, progress=False)
    assert result.value == pytest.approx(float(top), rel=1e-4)
    trace = hessian_trace(model, loader, max_batches=2, samples=200, progress=False)
    variance = 2.0 * float((dense**2).sum() - (torch.diagonal(dense) ** 2).sum())
    assert abs(trace.value - float(torch.trace(dense))) < 4 * math.sqrt(variance / 200)
    assert trace.num_examples == 32  # max_batches=2 of 16 examples


# --------------------------------------------------------------------------- every measure
@pytest.mark.parametrize("measure", MEASURES)
def test_sharp_minimum_ranks_above_flat_minimum(measure):
    """H = 100 I vs H = I at the minimum: every measure scales exactly with the curvature (f0 = 0)."""
    n, x0 = 20, randn(20, seed=0)
    options = SharpnessOptions(epsilon=1e-2, subspace_dim=3, repeats=2, trace_samples=4, power_iterations=5)
    flat = measure_sharpness(Quadratic(torch.eye(n), x0), BATCHES, measure, options, progress=False)
    sharp = measure_sharpness(Quadratic(100 * torch.eye(n), x0), BATCHES, measure, options, progress=False)
    assert flat.value > 0
    assert sharp.value == pytest.approx(100 * flat.value, rel=1e-6)


def test_loss_is_the_example_weighted_mean_over_the_first_batches_in_eval_mode():
    torch.manual_seed(0)
    model = TinyClassifier(dropout=0.5).double().train()
    data = make_classification_data(n=10, seed=2)
    batches = [{"x": torch.stack([d["x"] for d in chunk]).double(), "labels": torch.stack([d["labels"] for d in chunk])}
               for chunk in (data.items[:6], data.items[6:8], data.items[8:])]  # fmt: skip
    result = epsilon_sharpness(model, batches, max_batches=2, progress=False)
    with torch.no_grad():
        model.eval()
        x = torch.cat([batches[0]["x"], batches[1]["x"]])
        labels = torch.cat([batches[0]["labels"], batches[1]["labels"]])
        expected = float(nn.functional.cross_entropy(model(x)["logits"], labels))
        model.train()
    assert result.loss == pytest.approx(expected, rel=1e-12)  # dropout off, sizes 6 and 2 weighted, batch 3 unused
    assert result.num_examples == 8
    assert result.value > 0


# --------------------------------------------------------------------------- bad input
class Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2), requires_grad=False)

    def forward(self, **batch):
        return {"loss": self.w.sum()}


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: measure_sharpness(Quadratic(torch.eye(2), torch.ones(2)), BATCHES, "sam"),
            "Unknown sharpness measure",
        ),
        (lambda: epsilon_sharpness(Quadratic(torch.eye(2), torch.ones(2)), []), "dataloader is empty"),
        (lambda: hessian_trace(Quadratic(torch.eye(2), torch.ones(2)), DataLoader([])), "dataloader is empty"),
        (lambda: hessian_top_eigenvalue(Frozen(), BATCHES), "no trainable parameters"),
        (lambda: epsilon_sharpness(Frozen(), BATCHES), "no trainable parameters"),
        (lambda: epsilon_sharpness(Quadratic(torch.eye(2), torch.ones(2)), BATCHES, epsilon=0.0), "epsilon"),
        (lambda: epsilon_sharpness(Quadratic(torch.eye(2), torch.ones(2)), BATCHES, subspace_dim=0), "subspace_dim"),
        (lambda: hessian_trace(Quadratic(torch.eye(2), torch.ones(2)), BATCHES, max_batches=0), "max_batches"),
        (lambda: hessian_trace(Quadratic(torch.eye(2), torch.ones(2)), [(torch.ones(2),)]), "mappings"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_low_precision_parameters_are_warned_about():
    model = Quadratic(torch.eye(3), torch.ones(3)).to(torch.bfloat16)
    with pytest.warns(UserWarning, match="rounded away"):
        result = epsilon_sharpness(model, BATCHES, max_iterations=2, progress=False)
    assert result.value >= 0 and model.weight.dtype == torch.bfloat16
