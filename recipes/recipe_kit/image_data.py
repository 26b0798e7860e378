"""Image classification data for the vision recipe: Hub datasets, image folders, IDX files, Fashion-MNIST offline.

`load_image_data` returns raw splits with an ``image`` column (PIL images or uint8 arrays) and a
``labels`` column (`datasets.ClassLabel`), checked before any training. `PixelPipeline` turns a batch of
them into normalized ``pixel_values`` tensors with torch/numpy only (no torchvision): channel
conversion, resizing, optional random crop with padding and horizontal flip.

Example:
    >>> import numpy as np, torch
    >>> pipe = PixelPipeline(channels=1, size=(28, 28), mean=[0.5], std=[0.5])
    >>> out = pipe({"image": [np.zeros((28, 28), np.uint8)], "labels": [3]})
    >>> tuple(out["pixel_values"].shape), out["labels"].tolist()
    ((1, 1, 28, 28), [3])
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import RecipeError
from .offline import IDX_FILES, fashion_mnist_dir, has_idx_files, idx_file

FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
FASHION_MNIST_NAMES = {"fashion_mnist", "fashion-mnist", FASHION_MNIST_HUB_ID}
FASHION_MNIST_LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_COLUMNS = ("image", "img", "pixel_values", "picture")
LABEL_COLUMNS = ("label", "labels", "fine_label", "coarse_label")
IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ---------------------------------------------------------------------------- IDX files
def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (MNIST format, optionally gzipped) as a numpy array.

    Example:
        >>> read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").shape  # doctest: +SKIP
        (10000,)
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES:
        raise RecipeError(f"{path} is not an IDX file (bad magic number).")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(IDX_TYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = raw[4 + 4 * ndim :]
    if len(body) != expected:
        raise RecipeError(f"{path}: header says {dims} ({expected} bytes of data) but the file has {len(body)}.")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def _idx_arrays(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_stem, labels_stem = IDX_FILES[split]
    images_path, labels_path = idx_file(folder, images_stem), idx_file(folder, labels_stem)
    assert images_path is not None and labels_path is not None
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim not in (3, 4) or labels.ndim != 1 or len(images) != len(labels):
        raise RecipeError(
            f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match (want N x H x W and N)."
        )
    return images, labels


def _idx_dataset(images: np.ndarray, labels: np.ndarray, names: list[str], where: str) -> Any:
    import datasets

    outside = sorted({int(v) for v in np.unique(labels) if not 0 <= v < len(names)})
    if outside:
        raise RecipeError(f"{where}: labels {outside[:10]} are outside the {len(names)} classes {names}.")
    shape = images.shape[1:]
    array_type = datasets.Array2D if len(shape) == 2 else datasets.Array3D
    features = datasets.Features(
        {"image": array_type(shape=shape, dtype="uint8"), "labels": datasets.ClassLabel(names=list(names))}
    )
    import pyarrow as pa

    column = pa.array(np.ascontiguousarray(images, dtype=np.uint8).reshape(-1))
    for size in reversed(shape):  # nest fixed-size lists innermost first: much faster than from_dict
        column = pa.FixedSizeListArray.from_arrays(column, size)
    table = pa.table({"image": column, "labels": pa.array(labels.astype(np.int64))})
    return datasets.Dataset(table.cast(features.arrow_schema))


def idx_datasets(folder: Path, names: list[str] | None = None) -> tuple[Any, Any]:
    """Train and test `datasets.Dataset` (``image`` uint8 arrays, ``labels``) from MNIST-style IDX files.

    ``names`` defaults to ``"0"``, ``"1"``, ... up to the largest label of either split.
    """
    train_images, train_labels = _idx_arrays(folder, "train")
    test_images, test_labels = _idx_arrays(folder, "test")
    if names is None:
        top = int(max(train_labels.max(initial=0), test_labels.max(initial=0)))
        names = [str(i) for i in range(top + 1)]
    return (
        _idx_dataset(train_images, train_labels, names, f"{folder} (train)"),
        _idx_dataset(test_images, test_labels, names, f"{folder} (t10k)"),
    )


# ---------------------------------------------------------------------------- pixels
@dataclass
class PixelPipeline:
    """Batch of images -> normalized ``pixel_values`` ``[B, C, H, W]`` (float32) and ``labels``.

    ``size`` resizes (bilinear, antialiased); ``None`` keeps the native size (all images must share it).
    ``crop_padding`` > 0 and ``flip`` add random-crop-with-padding and horizontal-flip augmentation,
    drawn from torch's global generator (seeded by the Trainer).
    """

    channels: int
    size: tuple[int, int] | None
    mean: list[float]
    std: list[float]
    crop_padding: int = 0
    flip: bool = False
    augment: bool = field(default=False)

    def to_unit_tensor(self, images: list[Any]) -> torch.Tensor:
        """Images (PIL, numpy or tensors; HW, HWC or CHW) as one float tensor in ``[0, 1]``."""
        if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 3:
            x = torch.from_numpy(images).unsqueeze(1).float() / 255.0  # a batch of grayscale arrays at once
            if x.shape[1] != self.channels:
                x = x.expand(-1, self.channels, -1, -1)
            if self.size is not None and tuple(x.shape[-2:]) != tuple(self.size):
                x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)
            return x.contiguous()
        tensors = [self._one(image) for image in images]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise RecipeError(f"Images of different sizes {sorted(shapes)[:3]}...: pass --image_size to resize them.")
        return torch.stack(tensors)

    def _one(self, image: Any) -> torch.Tensor:
        if hasattr(image, "convert"):  # PIL
            image = np.asarray(image.convert("L" if self.channels == 1 else "RGB"))
        array = torch.as_tensor(np.array(image))  # a writable copy
        if array.ndim == 2:
            array = array.unsqueeze(0)
        elif array.ndim == 3 and array.shape[-1] in (1, 3, 4) and array.shape[0] not in (1, 3, 4):
            array = array.permute(2, 0, 1)  # HWC -> CHW
        if array.ndim != 3:
            raise RecipeError(f"Cannot read an image of shape {tuple(array.shape)}.")
        x = array.float() if array.is_floating_point() else array.float() / 255.0  # integers: 0..255
        if x.shape[0] == 4:
            x = x[:3]  # drop alpha
        if x.shape[0] != self.channels:
            if x.shape[0] == 1:
                x = x.expand(self.channels, -1, -1)
            elif self.channels == 1:
                x = (x * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0, keepdim=True)
            else:
                raise RecipeError(f"Cannot turn a {x.shape[0]}-channel image into {self.channels} channels.")
        if self.size is not None and tuple(x.shape[-2:]) != tuple(self.size):
            x = F.interpolate(x.unsqueeze(0), size=self.size, mode="bilinear", antialias=True, align_corners=False)[0]
        return x.contiguous()

    def random_crop(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad by ``crop_padding`` and cut a random window of the original size from each image."""
        pad = self.crop_padding
        batch, channels, height, width = x.shape
        padded = F.pad(x, (pad, pad, pad, pad))
        top = torch.randint(0, 2 * pad + 1, (batch,))
        left = torch.randint(0, 2 * pad + 1, (batch,))
        rows = (top[:, None] + torch.arange(height)[None, :])[:, None, :, None]
        cols = (left[:, None] + torch.arange(width)[None, :])[:, None, None, :]
        index_b = torch.arange(batch)[:, None, None, None]
        index_c = torch.arange(channels)[None, :, None, None]
        return padded[index_b, index_c, rows, cols]

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        x = self.to_unit_tensor(batch["image"])
        if self.augment and self.crop_padding > 0:
            x = self.random_crop(x)
        if self.augment and self.flip:
            mask = torch.rand(x.shape[0]) < 0.5
            x = torch.where(mask[:, None, None, None], x.flip(-1), x)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return {"pixel_values": (x - mean) / std, "labels": torch.as_tensor(batch["labels"], dtype=torch.long)}


class PixelDataset(torch.utils.data.Dataset):
    """A raw ``image``/``labels`` dataset seen through a `PixelPipeline`, one batch of indices at a time.

    Fixed-shape arrays are read in numpy format (no per-pixel Python objects); PIL images as PIL images.
    """

    def __init__(self, dataset: Any, pipeline: PixelPipeline) -> None:
        import datasets

        arrays = isinstance(dataset.features["image"], (datasets.Array2D, datasets.Array3D))
        self.dataset = dataset.with_format("numpy") if arrays else dataset
        self.pipeline = pipeline
        # Fixed-shape uint8 arrays are small (Fashion-MNIST: 47 MB): keep them in memory for fast random access.
        whole = self.dataset[:] if arrays else None
        dtype = dataset.features["image"].dtype if arrays else None
        self._images = np.asarray(whole["image"], dtype=dtype) if whole is not None else None
        self._labels = np.asarray(whole["labels"]) if whole is not None else None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        if self._images is not None and self._labels is not None:
            rows = np.asarray(indices)
            batch = self.pipeline({"image": self._images[rows], "labels": self._labels[rows]})
        else:
            batch = self.pipeline(self.dataset[list(indices)])
        return [{"pixel_values": batch["pixel_values"][i], "labels": batch["labels"][i]} for i in range(len(indices))]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]


def processed_dataset(dataset: Any, pipeline: PixelPipeline) -> Any:
    """The tensor-ready dataset (``pixel_values`` float32 ``[C, H, W]``, ``labels``) for ``save_to_disk``."""
    import datasets

    view = PixelDataset(dataset, pipeline)
    first = view[0]["pixel_values"]
    features = datasets.Features(
        {
            "pixel_values": datasets.Array3D(shape=tuple(first.shape), dtype="float32"),
            "labels": datasets.ClassLabel(names=dataset.features["labels"].names),
        }
    )

    def convert(batch: dict[str, list[Any]]) -> dict[str, Any]:
        out = pipeline(batch)
        return {"pixel_values": out["pixel_values"].numpy(), "labels": out["labels"].numpy()}

    source = view.dataset
    return source.map(convert, batched=True, batch_size=512, remove_columns=source.column_names, features=features)


def channel_stats(dataset: Any, pipeline: PixelPipeline, limit: int = 5000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of up to ``limit`` images (in ``[0, 1]``, after resizing)."""
    count = min(limit, len(dataset))
    view = PixelDataset(dataset, pipeline).dataset
    sums = torch.zeros(pipeline.channels, dtype=torch.float64)
    squares = torch.zeros(pipeline.channels, dtype=torch.float64)
    pixels = 0
    for start in range(0, count, 1000):
        x = pipeline.to_unit_tensor(view[start : min(start + 1000, count)]["image"]).double()
        sums += x.sum(dim=(0, 2, 3))
        squares += (x**2).sum(dim=(0, 2, 3))
        pixels += x.shape[0] * x.shape[2] * x.shape[3]
    mean = sums / pixels
    std = (squares / pixels - mean**2).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


# ---------------------------------------------------------------------------- sources
@dataclass
class ImageDataRequest:
    """What the user asked for (the vision recipe's data options)."""

    dataset_name: str | None = "fashion_mnist"
    dataset_config_name: str | None = None
    train_split: str = "train"
    eval_split: str | None = None
    train_dir: str | None = None
    validation_dir: str | None = None
    idx_dir: str | None = None
    label_names: list[str] | None = None
    image_column: str | None = None
    label_column: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    split_seed: int = 42


@dataclass
class ImageData:
    """Raw ``image``/``labels`` splits, their label names, native image shape and a description."""

    train: Any
    eval: Any
    label_names: list[str]
    channels: int
    size: tuple[int, int] | None
    info: dict[str, Any]


def _fashion_mnist_offline(folder: Path) -> tuple[Any, Any, dict[str, Any]]:
    train, test = idx_datasets(folder, list(FASHION_MNIST_LABELS))
    info = {
        "name": "Fashion-MNIST",
        "slug": "fashion-mnist",
        "hub_id": FASHION_MNIST_HUB_ID,
        "train_split": "train",
        "eval_splits": ["test"],
        "notes": (
            f"Read from the IDX files of the Debian package dataset-fashion-mnist ({folder}); the same 60,000 "
            f"training and 10,000 test images (28x28 grayscale, 10 classes) as {FASHION_MNIST_HUB_ID}."
        ),
    }
    return train, test, info


def _idx_folder(request: ImageDataRequest) -> tuple[Any, Any, dict[str, Any]]:
    folder = Path(request.idx_dir or "")
    if not has_idx_files(folder):
        wanted = ", ".join(f"{stem}[.gz]" for pair in IDX_FILES.values() for stem in pair)
        raise RecipeError(f"--idx_dir {folder} must hold the four IDX files {wanted}.")
    train, test = idx_datasets(folder, list(request.label_names) if request.label_names else None)
    info = {"name": f"IDX files ({folder.name})", "slug": "idx", "train_split": "train", "eval_splits": ["t10k"]}
    return train, test, info


def _pick_column(columns: list[str], explicit: str | None, candidates: tuple[str, ...], what: str, flag: str) -> str:
    if explicit:
        if explicit not in columns:
            raise RecipeError(f"{what} column {explicit!r} not found; the data has columns {columns}.")
        return explicit
    for name in candidates:
        if name in columns:
            return name
    raise RecipeError(f"Could not find the {what} column among {columns}; pass {flag}.")


def _hub_or_folder(request: ImageDataRequest) -> tuple[Any, Any, dict[str, Any]]:
    import datasets

    if request.train_dir:
        for flag, folder in (("--train_dir", request.train_dir), ("--validation_dir", request.validation_dir)):
            if folder and not Path(folder).is_dir():
                raise RecipeError(f"{flag} {folder} is not a directory.")
        files = {"train": str(Path(request.train_dir) / "**")}
        if request.validation_dir:
            files["validation"] = str(Path(request.validation_dir) / "**")
        try:
            raw = datasets.load_dataset("imagefolder", data_files=files)
        except Exception as err:  # the builder raises many different types
            raise RecipeError(f"Could not read the image folders {list(files.values())}: {err}") from err
        info = {"name": f"image folder {Path(request.train_dir).name}", "slug": "imagefolder", "train_split": "train"}
    else:
        try:
            raw = datasets.load_dataset(request.dataset_name, request.dataset_config_name)
        except (ConnectionError, OSError, ValueError) as err:
            raise RecipeError(
                f"Could not load dataset {request.dataset_name!r} from the Hub: {err}\nOffline, only Fashion-MNIST "
                "has a local copy (apt-get install -y dataset-fashion-mnist); or pass --train_dir / --idx_dir."
            ) from err
        info = {
            "name": request.dataset_name,
            "slug": str(request.dataset_name).split("/")[-1],
            "hub_id": request.dataset_name,
            "config": request.dataset_config_name,
            "train_split": request.train_split,
        }
    if request.train_split not in raw and not request.train_dir:
        raise RecipeError(f"No split {request.train_split!r}; the dataset has {list(raw)}.")
    train = raw["train" if request.train_dir else request.train_split]
    eval_split = request.eval_split or next((s for s in ("validation", "test") if s in raw), None)
    if eval_split is not None and eval_split not in raw:
        raise RecipeError(f"No split {eval_split!r}; the dataset has {list(raw)}.")
    if eval_split is None:
        stratify = "label" if isinstance(train.features.get("label"), datasets.ClassLabel) else None
        split = train.train_test_split(test_size=0.1, seed=request.split_seed, stratify_by_column=stratify)
        train, evaluation = split["train"], split["test"]
        info["eval_splits"] = [f"10% of {info['train_split']} (seed {request.split_seed})"]
    else:
        evaluation = raw[eval_split]
        info["eval_splits"] = [eval_split]
    image_column = _pick_column(train.column_names, request.image_column, IMAGE_COLUMNS, "image", "--image_column")
    label_column = _pick_column(train.column_names, request.label_column, LABEL_COLUMNS, "label", "--label_column")
    for column in (image_column, label_column):
        if column not in evaluation.column_names:
            raise RecipeError(f"The evaluation split lacks column {column!r}; it has {evaluation.column_names}.")
    feature = train.features[label_column]
    if not isinstance(feature, datasets.ClassLabel):
        raise RecipeError(
            f"Label column {label_column!r} is {feature}, not class labels (datasets.ClassLabel); pick another "
            "--label_column."
        )
    keep = [image_column, label_column]
    train = train.select_columns(keep).rename_columns({image_column: "image", label_column: "labels"})
    evaluation = evaluation.select_columns(keep).rename_columns({image_column: "image", label_column: "labels"})
    return train, evaluation, info


def _check_labels(train: Any, evaluation: Any) -> list[str]:
    names = list(train.features["labels"].names)
    eval_names = list(evaluation.features["labels"].names)
    if eval_names != names:
        raise RecipeError(f"Training classes {names} and evaluation classes {eval_names} differ.")
    train_labels = np.asarray(train["labels"])
    eval_labels = np.asarray(evaluation["labels"])
    for split, labels in (("train", train_labels), ("eval", eval_labels)):
        bad = sorted({int(v) for v in np.unique(labels) if not 0 <= v < len(names)})
        if bad:
            raise RecipeError(f"Labels {bad[:10]} of the {split} split are outside the {len(names)} classes {names}.")
    unseen = sorted(set(np.unique(eval_labels).tolist()) - set(np.unique(train_labels).tolist()))
    if unseen:
        raise RecipeError(
            f"Evaluation classes {[names[i] for i in unseen][:10]} never occur in the training data; the classifier "
            "could not learn them. Check the data (or use more training examples)."
        )
    return names


def _native_shape(dataset: Any, probe: int = 64) -> tuple[int, tuple[int, int] | None]:
    shapes = set()
    channels = 1
    for image in dataset.select(range(min(probe, len(dataset))))["image"]:
        if hasattr(image, "mode"):
            channels = max(channels, 1 if image.mode in ("L", "1", "I", "F", "I;16") else 3)
            shapes.add((image.height, image.width))
        else:
            array = np.asarray(image)
            if array.ndim == 3:
                channel_axis = -1 if array.shape[-1] in (1, 3, 4) else 0
                channels = max(channels, min(3, array.shape[channel_axis]))
                array = np.moveaxis(array, channel_axis, 0)[0]
            shapes.add(tuple(array.shape))
    return channels, (shapes.pop() if len(shapes) == 1 else None)


def _subsample(dataset: Any, limit: int | None, seed: int) -> Any:
    if limit is None or limit >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(limit))


def load_image_data(request: ImageDataRequest, use_hub: bool, fashion_mnist_folder: str | None = None) -> ImageData:
    """Load, subsample and check the data; raises `RecipeError` for any problem.

    Fashion-MNIST (the default) is read from the Debian package when installed (the same data as the Hub's),
    else from the Hub when ``use_hub``; other names always come from the Hub.
    """
    if request.idx_dir:
        train, evaluation, info = _idx_folder(request)
    elif request.train_dir:
        train, evaluation, info = _hub_or_folder(request)
    elif request.validation_dir:
        raise RecipeError("--validation_dir needs --train_dir too.")
    elif request.dataset_name in FASHION_MNIST_NAMES:
        try:
            folder = fashion_mnist_dir(fashion_mnist_folder)
        except RecipeError:
            if not use_hub:
                raise
            train, evaluation, info = _hub_or_folder(
                ImageDataRequest(**{**request.__dict__, "dataset_name": FASHION_MNIST_HUB_ID})
            )
        else:
            train, evaluation, info = _fashion_mnist_offline(folder)
    elif request.dataset_name:
        if not use_hub:
            raise RecipeError(
                f"The Hub is not reachable, and {request.dataset_name!r} has no offline copy (only Fashion-MNIST "
                "has one). Pass --train_dir/--validation_dir or --idx_dir, or run where the Hub is reachable."
            )
        train, evaluation, info = _hub_or_folder(request)
    else:
        raise RecipeError("Pass --dataset_name, --train_dir or --idx_dir.")

    train = _subsample(train, request.max_train_samples, request.split_seed)
    evaluation = _subsample(evaluation, request.max_eval_samples, request.split_seed)
    if len(train) == 0 or len(evaluation) == 0:
        raise RecipeError("The training or evaluation split is empty.")
    names = _check_labels(train, evaluation)
    channels, size = _native_shape(train)
    info.update({"num_train": len(train), "num_eval": len(evaluation), "label_names": names})
    return ImageData(train, evaluation, names, channels, size, info)
