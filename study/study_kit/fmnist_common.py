"""Pieces shared by the Fashion-MNIST studies (``fmnist_large_batch.py``, ``fmnist_ghost_batch.py``).

* :class:`KeskarMLP` -- the fully connected net with batch norm the studies train.
* :func:`load_data` -- train / validation (stratified, carved from train) / test (official ``t10k``).
* :func:`read_runs`, :func:`append_run` -- the ``runs.jsonl`` ledger (defined in :mod:`study_kit.ledger`).
* :func:`measure_sharpness_of`, :func:`sharpness_batches`, :func:`measure_sharpness` -- epsilon-sharpness and top
  Hessian eigenvalue (the last with a study's sharpness settings).
* :func:`save_weights`, :func:`load_keskar` -- a trained model to and from a ``.safetensors`` file.
* :func:`interpolate_models`, :func:`interpolation_lines` -- the 1-D interpolation plot between two trained
  models, and the report's lines for a list of saved model pairs.

The studies import it as ``study_kit.fmnist_common`` (installed with the package from a checkout).

Example:
    >>> import torch
    >>> model = KeskarMLP(hidden=8, depth=1)
    >>> model(torch.zeros(2, 784))["logits"].shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import EvalPrediction

from hf_smoothout.analysis import epsilon_sharpness, hessian_top_eigenvalue, interpolation_landscape, save_landscape

from .ledger import append_run as append_run  # re-exported for code that imports the ledger from here
from .ledger import read_runs as read_runs

# alpha in [0, 1] only: beyond it the batch-norm running variances extrapolate to negative values and the
# loss is undefined.
INTERPOLATION_ALPHAS = [i / 20 for i in range(21)]
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530  # training-set pixel statistics


class KeskarMLP(nn.Module):
    """784 -> depth x (Linear, BatchNorm, ReLU) -> 10.

    Example:
        >>> sum(p.numel() for p in KeskarMLP(512, 5).parameters())
        1462794
    """

    def __init__(self, hidden: int = 512, depth: int = 5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 28 * 28
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, 10)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.classifier(self.body(pixel_values.flatten(1)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class TensorExamples(torch.utils.data.Dataset):
    """Examples held as two tensors; items are ``{"pixel_values", "labels"}`` dicts.

    Example:
        >>> data = TensorExamples(torch.zeros(5, 784), torch.arange(5))
        >>> len(data.subset(2)), sorted(data[0])
        (2, ['labels', 'pixel_values'])
    """

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor) -> None:
        self.pixels, self.labels = pixels, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}

    def subset(self, count: int | None, seed: int = 0) -> TensorExamples:
        """``count`` examples drawn without replacement (seeded); all of them if ``count`` is None or too big."""
        if count is None or count >= len(self):
            return self
        index = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:count]
        return TensorExamples(self.pixels[index], self.labels[index])


@dataclass
class MLPStudyOptions:
    """Options the Fashion-MNIST studies share: the data split, the 5x512 batch-norm MLP and the sharpness measures.

    Each study's argument dataclass extends it (its own fields follow these in ``--help``).
    """

    validation_size: int = field(default=5000, metadata={"help": "Validation examples carved from train."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap on training examples (tests)."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Cap on test examples (tests)."})
    hidden: int = field(default=512, metadata={"help": "Width of the hidden layers."})
    depth: int = field(default=5, metadata={"help": "Number of hidden layers."})
    sharpness_samples: int = field(default=2000, metadata={"help": "Training examples of the sharpness measures."})
    sharpness_epsilon: float = field(default=5e-4, metadata={"help": "Keskar box size eps."})
    sharpness_iterations: int = field(default=10, metadata={"help": "L-BFGS-B iterations."})
    sharpness_repeats: int = field(default=3, metadata={"help": "Random starts (or subspaces) of epsilon-sharpness."})
    hessian_iterations: int = field(default=20, metadata={"help": "Power iterations for the top eigenvalue."})
    fashion_mnist_dir: str | None = field(default=None, metadata={"help": "Folder of the Fashion-MNIST IDX files."})


def stratified_split(labels: np.ndarray, holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, holdout) with ``holdout`` examples spread evenly over classes.

    Example:
        >>> train, held = stratified_split(np.array([0, 0, 1, 1]), 2, seed=0)
        >>> len(train), len(held)
        (2, 2)
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    held: list[np.ndarray] = []
    for c in classes:
        members = rng.permutation(np.flatnonzero(labels == c))
        held.append(members[: round(holdout * len(members) / len(labels))])
    held_index = np.sort(np.concatenate(held))
    mask = np.ones(len(labels), dtype=bool)
    mask[held_index] = False
    return np.flatnonzero(mask), held_index


def read_idx_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[n, 28, 28]`` (uint8) and labels ``[n]`` of an IDX split (``train`` / ``test``)."""
    from recipe_kit.image_data import read_idx
    from recipe_kit.offline import IDX_FILES, idx_file

    images, labels = (idx_file(folder, stem) for stem in IDX_FILES[split])
    return read_idx(images), read_idx(labels)


def load_data(
    fashion_mnist_dir: str | None = None,
    validation_size: int = 5000,
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
) -> dict[str, TensorExamples]:
    """Fashion-MNIST train / validation (carved from train) / test, pixels in [0, 1], normalized.

    The validation split is stratified and seeded (seed 1234), at most a tenth of the training examples;
    the test split is the official ``t10k`` (optionally capped by a seeded subset).

    Example:
        >>> data = load_data(max_train_samples=600, max_test_samples=100)  # doctest: +SKIP
        >>> len(data["train"]), len(data["validation"]), len(data["test"])  # doctest: +SKIP
        (540, 60, 100)
    """
    from recipe_kit.offline import fashion_mnist_dir as find_fashion_mnist

    folder = find_fashion_mnist(fashion_mnist_dir)
    train_x, train_y = read_idx_split(folder, "train")
    test_x, test_y = read_idx_split(folder, "test")
    if max_train_samples is not None:
        keep, _ = stratified_split(train_y, len(train_y) - max_train_samples, seed=7)
        train_x, train_y = train_x[keep], train_y[keep]
    validation = min(validation_size, len(train_y) // 10)
    train_index, val_index = stratified_split(train_y, validation, seed=1234)

    def tensors(x: np.ndarray, y: np.ndarray) -> TensorExamples:
        pixels = (torch.from_numpy(x.astype(np.float32)).reshape(len(x), -1) / 255.0 - FASHION_MNIST_MEAN) / (
            FASHION_MNIST_STD
        )
        return TensorExamples(pixels, torch.from_numpy(y.astype(np.int64)))

    test = tensors(test_x, test_y).subset(max_test_samples)
    return {
        "train": tensors(train_x[train_index], train_y[train_index]),
        "validation": tensors(train_x[val_index], train_y[val_index]),
        "test": test,
    }


def accuracy(pred: EvalPrediction) -> dict[str, float]:
    """``compute_metrics`` of the Trainer: top-1 accuracy."""
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, data: TensorExamples, batch_size: int = 2048) -> float:
    """Top-1 accuracy of ``model`` on ``data`` in eval mode; the model's train/eval mode is restored.

    Example:
        >>> model = KeskarMLP(hidden=8, depth=1)
        >>> 0.0 <= evaluate_accuracy(model, TensorExamples(torch.zeros(4, 784), torch.zeros(4, dtype=torch.long)))
        True
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    try:
        for start in range(0, len(data), batch_size):
            pixels = data.pixels[start : start + batch_size].to(device)
            labels = data.labels[start : start + batch_size].to(device)
            correct += int((model(pixels)["logits"].argmax(-1) == labels).sum())
    finally:
        model.train(was_training)
    return correct / max(len(data), 1)


def save_weights(model: nn.Module, path: Path) -> None:
    """The model's state dict (on the CPU) as a ``.safetensors`` file; :func:`load_keskar` reads it back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))


def load_keskar(path: Path, hidden: int, depth: int) -> KeskarMLP:
    """A :class:`KeskarMLP` with the weights of a ``.safetensors`` file, in eval mode."""
    model = KeskarMLP(hidden, depth)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def sharpness_batches(train: TensorExamples, samples: int, batch_size: int = 500) -> list[dict[str, torch.Tensor]]:
    """The fixed training subset (seed 11) the sharpness measures use, as a list of batches."""
    subset = train.subset(samples, seed=11)
    return list(torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False))


def measure_sharpness_of(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    *,
    epsilon: float,
    iterations: int,
    repeats: int,
    hessian_iterations: int,
    subspace_dim: int | None = None,
) -> dict[str, float]:
    """Keskar epsilon-sharpness (full space; and in a random ``subspace_dim``-D subspace if given) and the top
    Hessian eigenvalue of ``model`` on ``batches``.

    Keys: ``epsilon_sharpness``, ``epsilon_sharpness_std``, ``hessian_top`` and, with a subspace,
    ``epsilon_subspace``, ``epsilon_subspace_std``.
    """
    common = {"epsilon": epsilon, "max_iterations": iterations, "repeats": repeats, "max_batches": None}
    eps = epsilon_sharpness(model, batches, progress=False, **common)
    top = hessian_top_eigenvalue(model, batches, max_iterations=hessian_iterations, max_batches=None, progress=False)
    out = {"epsilon_sharpness": eps.value, "epsilon_sharpness_std": eps.std, "hessian_top": top.value}
    if subspace_dim is not None:
        sub = epsilon_sharpness(model, batches, subspace_dim=subspace_dim, progress=False, **common)
        out.update(epsilon_subspace=sub.value, epsilon_subspace_std=sub.std)
    return out


def measure_sharpness(
    model: nn.Module, train: TensorExamples, options: MLPStudyOptions, subspace_dim: int | None = None
) -> dict[str, float]:
    """:func:`measure_sharpness_of` on the fixed training subset, with the sharpness settings of ``options``."""
    return measure_sharpness_of(
        model,
        sharpness_batches(train, options.sharpness_samples),
        epsilon=options.sharpness_epsilon,
        iterations=options.sharpness_iterations,
        repeats=options.sharpness_repeats,
        hessian_iterations=options.hessian_iterations,
        subspace_dim=subspace_dim,
    )


def interpolate_models(
    model_a: nn.Module,
    model_b: nn.Module,
    data: dict[str, TensorExamples],
    folder: Path,
    *,
    second_split: str = "validation",
) -> dict[str, Path]:
    """1-D interpolation ``alpha * B + (1 - alpha) * A`` on 2,000 training and 2,000 test examples; files in
    ``folder`` (``landscape_interpolation.png`` / ``.csv`` / ``.json``). ``second_split`` names the test curve."""
    loaders = {
        "train": torch.utils.data.DataLoader(data["train"].subset(2000, seed=5), batch_size=1000),
        second_split: torch.utils.data.DataLoader(data["test"].subset(2000, seed=5), batch_size=1000),
    }
    result = interpolation_landscape(
        model_a, model_b, loaders, alphas=INTERPOLATION_ALPHAS, max_batches=None, progress=False
    )
    return save_landscape(result, folder)


def interpolation_lines(
    out: Path,
    pairs: list[tuple[str, str, str]],
    data: dict[str, TensorExamples],
    hidden: int,
    depth: int,
    *,
    seed: int,
    second_split: str = "validation",
) -> list[str]:
    """Interpolate each ``(name, key_a, key_b)`` pair of saved models (``out/models/<key>.safetensors``) into
    ``out/plots/<name>/``; one report line per pair (or a line saying its models of ``seed`` are not there).

    Example:
        >>> interpolation_lines(Path("/tmp/none"), [("a_vs_b", "k1", "k2")], {}, 8, 1, seed=0)
        ['- `a_vs_b`: the models of seed 0 are not in this output folder (kept: `plots/a_vs_b/`)']
    """
    lines = []
    for name, *keys in pairs:
        files = [out / "models" / f"{key}.safetensors" for key in keys]
        if not all(f.is_file() for f in files):
            lines.append(f"- `{name}`: the models of seed {seed} are not in this output folder (kept: `plots/{name}/`)")
            continue
        models = [load_keskar(f, hidden, depth) for f in files]
        paths = interpolate_models(*models, data, out / "plots" / name, second_split=second_split)
        lines.append(f"- `{name}`: {keys[0]} -> {keys[1]}: `{paths['png'].relative_to(out)}`")
    return lines
