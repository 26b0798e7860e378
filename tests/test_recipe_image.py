"""End-to-end runs of recipes/image_classification.py on tiny data: Fashion-MNIST offline, IDX files,
image folders, models built from configs, learning-rate scaling, gradient scale, and bad input."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_recipe_help

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(RECIPES))

from recipe_kit.errors import RecipeError  # noqa: E402
from recipe_kit.offline import fashion_mnist_dir  # noqa: E402

COMMON = ["--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--use_cpu", "--seed", "5"]


def load_recipe():
    spec = importlib.util.spec_from_file_location("recipe_image_classification", RECIPES / "image_classification.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


vision = load_recipe()


def has_fashion_mnist() -> bool:
    try:
        fashion_mnist_dir()
    except RecipeError:
        return False
    return True


needs_fashion_mnist = pytest.mark.skipif(
    not has_fashion_mnist(),
    reason="Fashion-MNIST missing: apt-get install -y dataset-fashion-mnist (or bash scripts/install_offline_data.sh)",
)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


def striped_images(n: int, classes: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class k: a bright horizontal stripe at row band k, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = rng.integers(0, 60, size=(n, size, size))
    band = size // classes
    for i, label in enumerate(labels):
        images[i, label * band : (label + 1) * band] += 180
    return images.clip(0, 255).astype(np.uint8), labels.astype(np.uint8)


@pytest.fixture
def idx_dir(tmp_path) -> Path:
    folder = tmp_path / "idx"
    folder.mkdir()
    for split, n, seed in (("train", 48, 0), ("t10k", 24, 1)):
        images, labels = striped_images(n, 3, 12, seed)
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels)  # plain and gzipped names both work
    return folder


def args_for(out: Path, *extra: str) -> list[str]:
    return [
        "--output_dir",
        str(out),
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "64",
        "--max_steps",
        "3",
        "--learning_rate",
        "1e-3",
        "--logging_steps",
        "1",
        *COMMON,
        *extra,
    ]


def read(path: Path) -> dict:
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------- end to end
@needs_fashion_mnist
def test_fashion_mnist_default_with_large_batch_lr_scaling(tmp_path, capsys):
    out = tmp_path / "fmnist"
    metrics = vision.main(
        [
            "--output_dir",
            str(out),
            "--max_train_samples",
            "256",
            "--max_eval_samples",
            "128",
            "--per_device_train_batch_size",
            "32",
            "--gradient_accumulation_steps",
            "2",
            "--per_device_eval_batch_size",
            "128",
            "--max_steps",
            "2",
            "--learning_rate",
            "1e-3",
            "--lr_scaling",
            "sqrt",
            "--reference_batch_size",
            "16",
            "--random_crop_padding",
            "2",
            "--random_flip",
            "--save_processed_data",
            *COMMON,
        ]
    )
    log = capsys.readouterr().out
    assert "effective batch = 32 per device x 2 gradient accumulation x 1 processes = 64" in log
    assert "learning rate = 0.001 x sqrt(64/16) = 0.001 x 2 = 0.002 (sqrt scaling)" in log
    assert "data: Fashion-MNIST; 256 train / 128 eval images, 28x28, 1 channel(s), 10 classes" in log
    assert "vit built from the default small ViT config" in log
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert read(out / "all_results.json")["eval_accuracy"] == metrics["eval_accuracy"]
    run = read(out / "smoothout_run.json")
    assert run["training"]["learning_rate"] == pytest.approx(0.002)
    assert run["training"]["base_learning_rate"] == pytest.approx(0.001)
    assert (
        run["training"]["effective_batch_size"] == 64 and run["dataset"]["hub_id"] == "zalando-datasets/fashion_mnist"
    )
    config = read(out / "config.json")
    assert config["image_size"] == 28 and config["num_channels"] == 1 and config["id2label"]["9"] == "Ankle boot"
    card = (out / "README.md").read_text()
    assert "effective batch size: 64 = 32 per device x 2 gradient accumulation x 1 process" in card
    assert "sqrt scaling of the base rate 0.001 from the reference batch 16" in card

    from datasets import load_from_disk

    evaluation = load_from_disk(str(out / "data" / "eval")).with_format("numpy")
    assert len(evaluation) == 128 and np.asarray(evaluation[0]["pixel_values"]).shape == (1, 28, 28)
    pixels = np.stack(evaluation["pixel_values"][:])
    mean, std = run["training"]["image_mean"][0], run["training"]["image_std"][0]
    assert abs(float(pixels.mean())) < 0.3 and mean == pytest.approx(0.286, abs=0.02) and std > 0.3


def test_idx_files_with_a_resnet_built_from_overrides(idx_dir, tmp_path, capsys):
    out = tmp_path / "resnet"
    metrics = vision.main(
        args_for(
            out,
            "--idx_dir",
            str(idx_dir),
            "--idx_label_names",
            "top",
            "middle",
            "bottom",
            "--model_type",
            "resnet",
            "--config_overrides",
            "embedding_size=8",
            "hidden_sizes=[8,16]",
            "depths=[1,1]",
            "--smoothout_adapt",
            "none",
            "--smoothout_strength",
            "0.002",
        )
    )
    assert "data: IDX files (idx); 48 train / 24 eval images, 12x12, 1 channel(s), 3 classes" in capsys.readouterr().out
    assert "eval_accuracy" in metrics
    config = read(out / "config.json")
    assert config["model_type"] == "resnet" and config["hidden_sizes"] == [8, 16] and config["num_channels"] == 1
    assert config["id2label"] == {"0": "top", "1": "middle", "2": "bottom"}
    card = (out / "README.md").read_text()
    assert "trained from scratch (resnet built from a configuration)" in card and "SmoothOut a=0.002 (none" in card


def test_the_papers_protocol_flags(idx_dir, tmp_path, capsys):
    """bn_mlp + ghost chunks (accumulation) + SGD momentum + step decay + momentum reset, as documented."""
    out = tmp_path / "ghost"
    argv = ["--output_dir", str(out), "--idx_dir", str(idx_dir), "--idx_label_names", "top", "middle", "bottom"]
    argv += ["--model_type", "bn_mlp", "--config_overrides", "hidden_size=16", "num_hidden_layers=2"]
    argv += ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "3", "--num_train_epochs", "4"]
    argv += ["--optim", "sgd", "--optim_args", "momentum=0.9", "--learning_rate", "0.1", "--lr_scaling", "sqrt"]
    argv += ["--reference_batch_size", "4", "--weight_decay", "1e-4", "--max_grad_norm", "5"]
    argv += ["--lr_milestones", "0.25", "0.5", "0.75", "--reset_momentum_each_epoch", "--logging_steps", "1"]
    argv += ["--smoothout_strength", "0.3", "--per_device_eval_batch_size", "64", *COMMON]
    metrics = vision.main(argv)
    text = capsys.readouterr().out
    assert "protocol: {'lr_milestones': [0.25, 0.5, 0.75], 'lr_decay': 0.1, 'reset_momentum_each_epoch': True}" in text
    assert "eval_accuracy" in metrics
    state = read(out / "trainer_state.json")
    lrs = [round(h["learning_rate"], 6) for h in state["log_history"] if "learning_rate" in h]
    top = 0.1 * math.sqrt(3)  # 0.1 x sqrt(12 / 4): 48 examples, 4 steps per epoch, 16 steps
    assert len(lrs) == 16 and lrs[:4] == [round(top, 6)] * 4
    assert lrs[4:8] == [round(top * 0.1, 6)] * 4 and lrs[12:] == [round(top * 0.001, 6)] * 4
    config = read(out / "config.json")
    assert config["model_type"] == "bn_mlp" and config["hidden_size"] == 16


def test_image_folders_rgb(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 3)):
        for label, color in (("red", (200, 20, 20)), ("blue", (20, 20, 200))):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(color) + rng.integers(-20, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    out = tmp_path / "folders"
    metrics = vision.main(
        args_for(out, "--train_dir", str(tmp_path / "train"), "--validation_dir", str(tmp_path / "val"))
    )
    assert metrics["eval_samples"] == 6
    config = read(out / "config.json")
    assert config["num_channels"] == 3 and config["image_size"] == 16
    assert sorted(config["label2id"]) == ["blue", "red"]


def first_grad_norm(out: Path) -> float:
    history = read(out / "trainer_state.json")["log_history"]
    return next(entry["grad_norm"] for entry in history if "grad_norm" in entry)


def test_gradient_accumulation_keeps_the_gradient_scale(idx_dir, tmp_path):
    def one_step(out: Path, batch: int, accumulation: int) -> list[str]:
        return args_for(
            out,
            "--idx_dir",
            str(idx_dir),
            "--smoothout_strength",
            "0",
            "--max_steps",
            "1",
            "--per_device_train_batch_size",
            str(batch),
            "--gradient_accumulation_steps",
            str(accumulation),
        )

    vision.main(one_step(tmp_path / "ga1", 16, 1))
    vision.main(one_step(tmp_path / "ga4", 4, 4))
    assert first_grad_norm(tmp_path / "ga4") == pytest.approx(first_grad_norm(tmp_path / "ga1"), rel=1e-4)


def test_seed_is_honoured(idx_dir, tmp_path):
    def run(name: str, seed: str) -> float:
        argv = args_for(tmp_path / name, "--idx_dir", str(idx_dir), "--random_crop_padding", "1", "--random_flip")
        return vision.main([*argv, "--seed", seed])["eval_loss"]  # the last --seed wins

    assert run("a", "7") == run("b", "7")
    assert run("c", "8") != run("a", "7")


# ---------------------------------------------------------------------------- errors
def test_missing_fashion_mnist_names_the_apt_command_and_the_install_script(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_SMOOTHOUT_FASHION_MNIST_DIR", str(tmp_path / "empty"))
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match="apt-get install -y dataset-fashion-mnist") as error:
        vision.main(args_for(out, "--source", "offline"))
    assert "bash scripts/install_offline_data.sh vision" in str(error.value)
    assert not out.exists()


def test_small_images_get_a_large_default_eval_batch(idx_dir, tmp_path, capsys):
    argv = args_for(tmp_path / "out", "--idx_dir", str(idx_dir), "--max_steps", "1")
    index = argv.index("--per_device_eval_batch_size")
    del argv[index : index + 2]
    vision.main(argv)
    assert "evaluation batch 1024 per device for 12x12 images" in capsys.readouterr().out
    vision.main([*argv, "--output_dir", str(tmp_path / "explicit"), "--per_device_eval_batch_size", "16"])
    assert "evaluation batch" not in capsys.readouterr().out  # an explicit value is kept


def test_help_opens_with_a_description_and_ends_with_examples(capsys):
    assert_recipe_help(
        vision.main, "Train or fine-tune an image classifier with SmoothOut", "--lr_scaling sqrt", capsys
    )


def bad_cases(idx_dir: Path, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    local = ["--idx_dir", str(idx_dir)]
    return {
        "batch zero": (
            [*local, "--per_device_train_batch_size", "0"],
            "per_device_train_batch_size must be a positive",
        ),
        "negative accumulation": ([*local, "--gradient_accumulation_steps", "-1"], "gradient_accumulation_steps must"),
        "scaling without reference": ([*local, "--lr_scaling", "linear"], "needs --reference_batch_size"),
        "eval batch zero": ([*local, "--per_device_eval_batch_size", "0"], "per_device_eval_batch_size must be"),
        "too few label names": ([*local, "--idx_label_names", "a", "b"], r"labels \[2\] are outside the 2 classes"),
        "not idx files": (["--idx_dir", str(tmp_path)], "must hold the four IDX files"),
        "unknown model type": ([*local, "--model_type", "no-such-model"], "Could not build the model config"),
        "text model": ([*local, "--model_type", "bert"], "bert has no image-classification model"),
        "unknown override": ([*local, "--config_overrides", "wingspan=3"], "vit configs have no setting 'wingspan'"),
        "two model sources": ([*local, "--model_type", "vit", "--model_config", "c.json"], "Pass only one of"),
        "no network dataset": (["--dataset_name", "cifar10", "--source", "offline"], "has no offline copy"),
        "nothing to train": ([*local, "--max_steps", "0", "--num_train_epochs", "0"], "Nothing to train"),
        "milestones out of range": ([*local, "--lr_milestones", "0.5", "1.5"], "fractions in"),
        "hub model offline": (
            [*local, "--model_name_or_path", "someone/not-cached", "--source", "offline"],
            "Could not load the image classifier someone/not-cached",
        ),
    }


BAD_NAMES = [
    "batch zero",
    "negative accumulation",
    "scaling without reference",
    "eval batch zero",
    "too few label names",
    "not idx files",
    "unknown model type",
    "text model",
    "unknown override",
    "two model sources",
    "no network dataset",
    "nothing to train",
    "milestones out of range",
    "hub model offline",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_input_fails_early_and_writes_nothing(name, idx_dir, tmp_path):
    argv, message = bad_cases(idx_dir, tmp_path)[name]
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match=message):
        vision.main(args_for(out, *argv))
    assert not out.exists()


def test_validation_classes_unseen_in_training(tmp_path):
    from PIL import Image

    for split, labels in (("train", ("cat", "dog")), ("val", ("cat", "dog", "owl"))):
        for label in labels:
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            Image.new("L", (8, 8), color=100).save(folder / "0.png")
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match=r"Evaluation classes \['owl'\] never occur in the training data"):
        vision.main(args_for(out, "--train_dir", str(tmp_path / "train"), "--validation_dir", str(tmp_path / "val")))
    assert not out.exists()


def test_lr_scaling_rules_and_idx_reader(tmp_path):
    from recipe_kit.batching import plan_batch
    from recipe_kit.image_data import read_idx

    linear = plan_batch(64, 4, 2, 0.1, "linear", 64)
    assert linear.effective == 512 and linear.learning_rate == pytest.approx(0.8)
    assert plan_batch(64, 4, 2, 0.1, "sqrt", 64).learning_rate == pytest.approx(0.1 * math.sqrt(8))
    assert plan_batch(64, 4, 2, 0.1).learning_rate == 0.1
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    write_idx(tmp_path / "a.gz", array)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(RecipeError, match="not an IDX file"):
        read_idx(tmp_path / "bad")


def test_pixel_pipeline_crop_flip_and_channels():
    import torch
    from recipe_kit.image_data import PixelPipeline

    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 255, (16, 6, 6)).astype(np.uint8)
    crop = PixelPipeline(1, None, [0.0], [1.0], crop_padding=2, augment=True)
    out = crop({"image": images, "labels": list(range(16))})["pixel_values"]
    padded = torch.nn.functional.pad(torch.from_numpy(images).float()[:, None] / 255.0, (2, 2, 2, 2))
    for i in range(16):  # every output is some 6x6 window of its zero-padded input
        windows = padded[i, 0].unfold(0, 6, 1).unfold(1, 6, 1).reshape(-1, 6, 6)
        assert any(torch.equal(out[i, 0], w) for w in windows)
    flip = PixelPipeline(1, None, [0.0], [1.0], flip=True, augment=True)
    flipped = flip({"image": images, "labels": [0] * 16})["pixel_values"]
    original = torch.from_numpy(images).float()[:, None] / 255.0
    assert all(torch.equal(flipped[i], original[i]) or torch.equal(flipped[i], original[i].flip(-1)) for i in range(16))
    rgb = PixelPipeline(3, (4, 4), [0.5] * 3, [0.5] * 3)({"image": [images[0]], "labels": [1]})["pixel_values"]
    assert rgb.shape == (1, 3, 4, 4) and torch.equal(rgb[0, 0], rgb[0, 2])
