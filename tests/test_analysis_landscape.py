"""Loss landscapes against closed forms, filter-normalized directions per layer type, and the written files."""

from __future__ import annotations

import csv
import json
import math

import matplotlib.image
import numpy as np
import pytest
import torch
from conftest import TinyClassifier, make_classification_data
from torch import nn
from torch.utils.data import DataLoader
from transformers.pytorch_utils import Conv1D

from hf_smoothout.analysis import (
    LandscapeResult,
    filter_normalized_direction,
    interpolation_landscape,
    random_landscape,
    save_landscape,
)

BATCHES = [{"labels": torch.zeros(3)}]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class MatrixQuadratic(nn.Module):
    """``loss = 0.5 * sum(h * (W - C)^2)`` with a 2-D weight (so random directions move it); no logits."""

    def __init__(self, weight: torch.Tensor, h: torch.Tensor, center: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone().double())
        self.register_buffer("h", h.double())
        self.register_buffer("center", center.double())

    def forward(self, **batch):
        return {"loss": 0.5 * (self.h * (self.weight - self.center) ** 2).sum()}


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def quadratic(w, h, c) -> float:
    return float(0.5 * (h * (w - c) ** 2).sum())


def network_loaders(seed: int = 0) -> dict[str, DataLoader]:
    train = make_classification_data(n=24, seed=seed)
    validation = make_classification_data(n=16, seed=seed + 100)
    return {"train": DataLoader(train, batch_size=8), "validation": DataLoader(validation, batch_size=8)}


def loss_and_accuracy(model: nn.Module, loader: DataLoader) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        x = torch.cat([b["x"] for b in loader])
        labels = torch.cat([b["labels"] for b in loader])
        logits = model(x)["logits"]
    return float(nn.functional.cross_entropy(logits, labels)), int((logits.argmax(1) == labels).sum()) / len(labels)


# --------------------------------------------------------------------------- interpolation
def test_interpolation_follows_the_closed_form_parabola():
    h, c = randn(3, 4, seed=0).abs() + 0.1, randn(3, 4, seed=1)
    w_a, w_b = randn(3, 4, seed=2), randn(3, 4, seed=3)
    alphas = np.linspace(-1.0, 2.0, 13)
    result = interpolation_landscape(
        MatrixQuadratic(w_a, h, c), MatrixQuadratic(w_b, h, c), BATCHES, alphas=alphas, progress=False
    )
    expected = [quadratic(a * w_b + (1 - a) * w_a, h, c) for a in alphas]
    assert result.kind == "interpolation" and result.alphas == pytest.approx(list(alphas), abs=0)
    assert result.metrics["train_loss"] == pytest.approx(expected, rel=1e-12)
    assert all(math.isnan(v) for v in result.metrics["train_accuracy"])  # no logits: accuracy undefined
    assert result.info["distance"] == pytest.approx(float((w_b - w_a).norm()), rel=1e-12)


def test_interpolation_endpoints_are_the_two_models_on_train_and_validation():
    torch.manual_seed(0)
    model_a = TinyClassifier()
    torch.manual_seed(1)
    model_b = TinyClassifier()
    loaders = network_loaders()
    result = interpolation_landscape(model_a, model_b, loaders, alphas=[0.0, 0.5, 1.0], progress=False)
    assert result.splits == ["train", "validation"]
    for split in ("train", "validation"):
        for index, model in ((0, model_a), (2, model_b)):
            loss, accuracy = loss_and_accuracy(model, loaders[split])
            assert result.metrics[f"{split}_loss"][index] == pytest.approx(loss, rel=1e-6)
            assert result.metrics[f"{split}_accuracy"][index] == accuracy
    assert result.info["num_examples"] == {"train": 24, "validation": 16}


@pytest.mark.parametrize(
    "model_b, message",
    [
        (lambda: TinyClassifier(hidden=9), "different shapes"),
        (lambda: nn.Sequential(nn.Linear(6, 3)), "only in model A"),
    ],
)
def test_interpolation_refuses_mismatched_architectures(model_b, message):
    with pytest.raises(ValueError, match=f"different architectures.*{message}"):
        interpolation_landscape(TinyClassifier(), model_b(), network_loaders(), progress=False)


# --------------------------------------------------------------------------- directions
class Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 4)
        self.conv = nn.Conv2d(2, 3, kernel_size=3)
        self.deconv = nn.ConvTranspose2d(3, 4, kernel_size=2)
        self.gpt2_conv1d = Conv1D(6, 5)  # stored [in=5, out=6]
        self.embedding = nn.Embedding(7, 4)
        self.layer_norm = nn.LayerNorm(4)
        self.batch_norm = nn.BatchNorm2d(3)


ROW_AXES = {"linear": 0, "conv": 0, "deconv": 1, "gpt2_conv1d": 1, "embedding": 0}


@pytest.mark.parametrize("layer", sorted(ROW_AXES))
def test_filter_normalized_rows_match_weight_rows(layer):
    torch.manual_seed(0)
    model = Zoo()
    names = [n for n, p in model.named_parameters()]
    direction = dict(zip(names, filter_normalized_direction(model, seed=3), strict=True))
    weight = getattr(model, layer).weight.detach().double()
    d = direction[f"{layer}.weight"]
    axis = ROW_AXES[layer]
    dims = tuple(i for i in range(weight.ndim) if i != axis)
    assert torch.allclose(torch.linalg.vector_norm(d, dim=dims), torch.linalg.vector_norm(weight, dim=dims), rtol=1e-9)
    assert not torch.allclose(d.abs(), weight.abs())  # random, not the weights themselves


def test_one_dimensional_and_normalization_parameters_get_zero_direction_by_default():
    torch.manual_seed(0)
    model = Zoo()
    names = [n for n, _ in model.named_parameters()]
    default = dict(zip(names, filter_normalized_direction(model, seed=3), strict=True))
    included = dict(zip(names, filter_normalized_direction(model, seed=3, include_one_dim=True), strict=True))
    one_dim = [n for n in names if n.endswith("bias") or "norm" in n]
    assert one_dim and all(float(default[n].abs().sum()) == 0.0 for n in one_dim)
    params = dict(model.named_parameters())
    for name in one_dim:  # included: each element its own row, |d_i| = |w_i|
        assert torch.allclose(included[name].abs(), params[name].detach().double().abs(), rtol=1e-12)
    for name in names:
        if name not in one_dim:
            assert torch.equal(default[name], included[name])


# --------------------------------------------------------------------------- random directions
def test_random_1d_landscape_follows_the_closed_form():
    h, c, w = randn(4, 5, seed=0).abs() + 0.1, randn(4, 5, seed=1), randn(4, 5, seed=2)
    model = MatrixQuadratic(w, h, c)
    d = filter_normalized_direction(model, seed=7)[0]
    alphas = [-1.0, -0.25, 0.0, 0.6, 1.0]
    result = random_landscape(model, BATCHES, alphas=alphas, seed=7, progress=False)
    assert result.kind == "random_1d" and result.betas is None
    assert result.metrics["train_loss"] == pytest.approx([quadratic(w + a * d, h, c) for a in alphas], rel=1e-12)
    assert result.metrics["train_loss"][2] == quadratic(w, h, c)  # alpha = 0 is the model itself, exactly


def test_random_2d_landscape_follows_the_closed_form():
    h, c, w = randn(4, 5, seed=0).abs() + 0.1, randn(4, 5, seed=1), randn(4, 5, seed=2)
    model = MatrixQuadratic(w, h, c)
    generator = torch.Generator().manual_seed(11)
    d1 = filter_normalized_direction(model, generator=generator)[0]
    d2 = filter_normalized_direction(model, generator=generator)[0]
    alphas, betas = [-1.0, 0.0, 0.5], [-0.5, 0.0, 1.0, 2.0]
    result = random_landscape(model, BATCHES, dims=2, alphas=alphas, betas=betas, seed=11, progress=False)
    grid = result.metrics["train_loss"]
    assert len(grid) == 3 and all(len(row) == 4 for row in grid)
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            assert grid[i][j] == pytest.approx(quadratic(w + a * d1 + b * d2, h, c), rel=1e-12)
    # the first direction of the 2-D landscape is the direction of the 1-D one with the same seed
    line = random_landscape(model, BATCHES, alphas=alphas, seed=11, progress=False)
    assert [grid[i][1] for i in range(3)] == pytest.approx(line.metrics["train_loss"], rel=1e-12)


def test_random_landscape_default_grids_and_bad_input():
    model = MatrixQuadratic(randn(2, 2, seed=0), torch.ones(2, 2), torch.zeros(2, 2))
    one = random_landscape(model, BATCHES, progress=False)
    two = random_landscape(model, BATCHES, dims=2, progress=False)
    assert one.alphas == pytest.approx(list(np.linspace(-1, 1, 21))) and len(one.metrics["train_loss"]) == 21
    assert two.betas == pytest.approx(list(np.linspace(-1, 1, 11))) and np.shape(two.metrics["train_loss"]) == (11, 11)
    with pytest.raises(ValueError, match="dims"):
        random_landscape(model, BATCHES, dims=3)
    with pytest.raises(ValueError, match="alphas"):
        random_landscape(model, BATCHES, alphas=[])
    with pytest.raises(ValueError, match="empty"):
        random_landscape(model, {"train": []})


# --------------------------------------------------------------------------- files
def landscape_of(kind: str) -> LandscapeResult:
    torch.manual_seed(0)
    model, loaders = TinyClassifier(), network_loaders()
    if kind == "interpolation":
        torch.manual_seed(1)
        return interpolation_landscape(model, TinyClassifier(), loaders, alphas=[-1, 0, 0.5, 1, 2], progress=False)
    if kind == "random_1d":
        return random_landscape(model, loaders, alphas=[-1, -0.5, 0, 0.5, 1], progress=False)
    return random_landscape(model, loaders, dims=2, alphas=[-1, 0, 1], betas=[-1, 0, 0.5, 1], progress=False)


@pytest.mark.parametrize("kind, figure_size, dpi", [
    ("interpolation", (9.6, 6.4), 100), ("random_1d", (4.0, 3.0), 50), ("random_2d", (8.0, 4.0), 80),
])  # fmt: skip
def test_saved_files_are_a_real_png_and_the_computed_curves(tmp_path, kind, figure_size, dpi):
    result = landscape_of(kind)
    paths = save_landscape(result, tmp_path / "analysis", figure_size=figure_size, dpi=dpi)
    assert {p.name for p in paths.values()} == {f"landscape_{kind}.{ext}" for ext in ("png", "csv", "json")}

    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(paths["png"])
    assert image.shape[:2] == (round(figure_size[1] * dpi), round(figure_size[0] * dpi))
    assert image[..., :3].std() > 0.05  # something was drawn

    with paths["csv"].open() as handle:
        rows = list(csv.DictReader(handle))
    names = list(result.metrics)
    if result.betas is None:
        assert [float(r["alpha"]) for r in rows] == result.alphas
        for name in names:
            assert [float(r[name]) for r in rows] == result.metrics[name]  # repr round-trips exactly
    else:
        assert len(rows) == len(result.alphas) * len(result.betas)
        for r in rows:
            i, j = result.alphas.index(float(r["alpha"])), result.betas.index(float(r["beta"]))
            for name in names:
                assert float(r[name]) == result.metrics[name][i][j]

    saved = json.loads(paths["json"].read_text())
    assert saved["kind"] == kind and saved["alphas"] == result.alphas and saved["betas"] == result.betas
    assert saved["metrics"] == result.metrics
    assert saved["info"]["num_examples"] == {"train": 24, "validation": 16}


def test_undefined_accuracy_is_an_empty_csv_cell_and_json_null(tmp_path):
    model = MatrixQuadratic(randn(2, 2, seed=0), torch.ones(2, 2), torch.zeros(2, 2))
    result = random_landscape(model, BATCHES, alphas=[0.0, 1.0], progress=False)
    paths = save_landscape(result, tmp_path)
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["train_accuracy"] for r in rows] == ["", ""]
    assert [float(r["train_loss"]) for r in rows] == result.metrics["train_loss"]
    assert json.loads(paths["json"].read_text())["metrics"]["train_accuracy"] == [None, None]
    assert matplotlib.image.imread(paths["png"]).shape[:2] == (640, 960)
