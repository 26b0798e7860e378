"""Train or fine-tune an image classifier with SmoothOut, built for large effective batches.

Any ``AutoModelForImageClassification``: a pretrained checkpoint (``--model_name_or_path``) or a
model built from a configuration (``--model_type vit|resnet|convnext|... [--config_overrides k=v ...]``
or ``--model_config config.json``). Data: a Hub dataset (``--dataset_name cifar10``), image folders
(``--train_dir``/``--validation_dir``), or MNIST-style IDX files (``--idx_dir``). The default is the full
Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (same data as the Hub's) with a small ViT
sized for 28x28 grayscale, so it runs with no network (``bash scripts/install_offline_data.sh vision``
installs it). ``--smoothout_strength 0`` is the baseline.

The effective batch (per-device batch x gradient accumulation x processes) is printed at the start;
``--lr_scaling sqrt|linear --reference_batch_size B0`` scales the learning rate to it.

Usage:
    python recipes/image_classification.py --output_dir out/fmnist --num_train_epochs 5 \\
        --per_device_train_batch_size 256 --gradient_accumulation_steps 4 \\
        --lr_scaling sqrt --reference_batch_size 128 --learning_rate 1e-3
    accelerate launch recipes/image_classification.py --dataset_name cifar10 --model_type resnet \\
        --config_overrides depths=[2,2,2,2] --output_dir out/cifar
    # the SmoothOut paper's protocol: its 5x512 batch-norm MLP, B = 4096 from 32 ghost chunks of 128
    # (fresh noise and batch norm per chunk), SGD 0.1 x sqrt(B/128), momentum 0.9 reset every epoch, weight
    # decay 1e-4, clipping 5, LR x0.1 at epochs 10/20/30 of 50
    python recipes/image_classification.py --model_type bn_mlp --output_dir out/fmnist-ghost \\
        --per_device_train_batch_size 128 --gradient_accumulation_steps 32 --num_train_epochs 50 \\
        --optim sgd --optim_args momentum=0.9 --learning_rate 0.1 --lr_scaling sqrt --reference_batch_size 128 \\
        --weight_decay 1e-4 --max_grad_norm 5 --lr_milestones 0.2 0.4 0.6 --reset_momentum_each_epoch \\
        --smoothout_adapt filter --smoothout_strength 0.3
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from recipe_kit import mlp  # noqa: F401  (registers --model_type bn_mlp)
from recipe_kit.arguments import (
    RunOptions,
    default_eval_batch_size,
    given_on_command_line,
    pin_memory_only_where_it_helps,
    recipe_parser,
)
from recipe_kit.batching import plan_from_arguments
from recipe_kit.errors import RecipeError, run_cli
from recipe_kit.image_data import (
    ImageData,
    ImageDataRequest,
    PixelDataset,
    PixelPipeline,
    channel_stats,
    load_image_data,
    processed_dataset,
)
from recipe_kit.offline import hub_reachable
from recipe_kit.outputs import close_distributed, describe_environment, finish_run, say
from recipe_kit.protocol import ProtocolOptions, ProtocolTrainer

from hf_smoothout import SmoothOutTrainingArguments

DEFAULT_DATASET = "fashion_mnist"


@dataclass
class ModelArguments:
    """A pretrained checkpoint, or a configuration to build a model from."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Pretrained image classifier (Hub id or folder) to fine-tune."}
    )
    model_type: str | None = field(
        default=None, metadata={"help": "Build a fresh model of this type (vit, resnet, convnext, ...)."}
    )
    model_config: str | None = field(
        default=None, metadata={"help": "Build a fresh model from this config.json (or a folder holding one)."}
    )
    config_overrides: list[str] | None = field(
        default=None,
        metadata={"help": "key=value settings of the built config, values in JSON: hidden_size=64 depths=[1,1]."},
    )
    image_size: int | None = field(
        default=None, metadata={"help": "Resize images to this size (default: the model's, else the data's)."}
    )
    image_mean: list[float] | None = field(default=None, metadata={"help": "Per-channel normalization mean."})
    image_std: list[float] | None = field(default=None, metadata={"help": "Per-channel normalization std."})


@dataclass
class DataArguments(RunOptions):
    """Which images, where from, and the augmentation."""

    dataset_name: str | None = field(
        default=DEFAULT_DATASET,
        metadata={"help": "Hub dataset (cifar10, ...). fashion_mnist is read from the Debian package if installed."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    train_split: str = field(default="train", metadata={"help": "Training split of the Hub dataset."})
    eval_split: str | None = field(
        default=None, metadata={"help": "Evaluation split (default: validation, else test, else a tenth of train)."}
    )
    train_dir: str | None = field(default=None, metadata={"help": "Image folder for training (class subfolders)."})
    validation_dir: str | None = field(default=None, metadata={"help": "Image folder for evaluation."})
    idx_dir: str | None = field(
        default=None,
        metadata={"help": "Folder with MNIST-style IDX files ({train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz])."},
    )
    fashion_mnist_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the Debian package's Fashion-MNIST files are (default: /usr/share/datasets/"
            "fashion-mnist, or $HF_SMOOTHOUT_FASHION_MNIST_DIR)."
        },
    )
    idx_label_names: list[str] | None = field(default=None, metadata={"help": "Class names for --idx_dir data."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: image or img)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (default: label)."})
    random_crop_padding: int = field(
        default=0, metadata={"help": "Augment training images: zero-pad by this many pixels, crop back at random."}
    )
    random_flip: bool = field(default=False, metadata={"help": "Augment training images with horizontal flips."})


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, ProtocolOptions, SmoothOutTrainingArguments]:
    """Parse the command line (or ``argv``) into the four argument dataclasses."""
    parser = recipe_parser((ModelArguments, DataArguments, ProtocolOptions, SmoothOutTrainingArguments), __doc__ or "")
    model_args, data_args, protocol, training_args = parser.parse_args_into_dataclasses(args=argv)
    pin_memory_only_where_it_helps(training_args, argv)
    return model_args, data_args, protocol, training_args


# ---------------------------------------------------------------------------- model
def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["hidden_size=64", "depths=[1,1]"]`` -> ``{"hidden_size": 64, "depths": [1, 1]}`` (JSON values, else text)."""
    overrides: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--config_overrides takes key=value items, got {item!r}.")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def default_config(data: ImageData) -> Any:
    """A small ViT sized for the data (Fashion-MNIST: 28x28x1, 4x4 patches, 4 layers of width 64, ~0.2M params)."""
    from transformers import ViTConfig

    size = data.size[0] if data.size is not None and data.size[0] == data.size[1] else 32
    patch = next((p for p in (4, 7, 8, 2) if size % p == 0), 1)
    return ViTConfig(
        image_size=size,
        patch_size=patch,
        num_channels=data.channels,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
    )


@dataclass
class BuiltModel:
    model: Any
    base_model: str | None
    description: str
    size: tuple[int, int] | None
    channels: int
    mean: list[float] | None
    std: list[float] | None


def _processor_settings(name: str, local_only: bool) -> dict[str, Any]:
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        settings, _ = ImageProcessingMixin.get_image_processor_dict(name, local_files_only=local_only)
    except (OSError, ValueError):
        return {}
    return settings


def _size_of(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return (int(value[0]), int(value[1]))
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return (int(value["height"]), int(value["width"]))
        if "shortest_edge" in value:
            return (int(value["shortest_edge"]), int(value["shortest_edge"]))
    return None


def build_model(model_args: ModelArguments, data: ImageData, local_only: bool = False) -> BuiltModel:
    """The classifier, where it came from, and the input size, channels and normalization it expects.

    ``local_only``: no Hub requests (local folders and the Hugging Face cache only).
    """
    from transformers import AutoConfig, AutoModelForImageClassification

    labels = {"num_labels": len(data.label_names), "id2label": dict(enumerate(data.label_names))}
    labels["label2id"] = {name: i for i, name in enumerate(data.label_names)}
    chosen = [n for n in ("model_name_or_path", "model_type", "model_config") if getattr(model_args, n)]
    if len(chosen) > 1:
        raise RecipeError(f"Pass only one of --{', --'.join(chosen)}.")
    overrides = parse_overrides(model_args.config_overrides)
    if model_args.model_name_or_path:
        if overrides:
            raise RecipeError("--config_overrides applies to models built from a config, not to pretrained ones.")
        name = model_args.model_name_or_path
        try:
            config = AutoConfig.from_pretrained(name, local_files_only=local_only, **labels)
            model = AutoModelForImageClassification.from_pretrained(
                name, config=config, ignore_mismatched_sizes=True, local_files_only=local_only
            )
        except (OSError, ValueError) as err:
            raise RecipeError(f"Could not load the image classifier {name}: {err}") from err
        processor = _processor_settings(name, local_only)
        size = (
            _size_of(processor.get("crop_size"))
            or _size_of(processor.get("size"))
            or _size_of(getattr(config, "image_size", None))
        )
        base = None if Path(name).is_dir() else name
        return BuiltModel(
            model,
            base,
            f"{name} (pretrained)",
            size,
            int(getattr(config, "num_channels", 3)),
            processor.get("image_mean"),
            processor.get("image_std"),
        )
    try:
        if model_args.model_config:
            config = AutoConfig.from_pretrained(model_args.model_config)
            origin = f"config {model_args.model_config}"
        elif model_args.model_type:
            config = AutoConfig.for_model(model_args.model_type)
            origin = f"a fresh {model_args.model_type} config"
        else:
            config = default_config(data)
            origin = "the default small ViT config"
    except (OSError, ValueError) as err:
        raise RecipeError(f"Could not build the model config: {err}") from err
    if not model_args.model_config:  # fit a fresh config to the data unless the user set these
        for key, value in (("num_channels", data.channels), ("image_size", data.size[0] if data.size else None)):
            if hasattr(config, key) and key not in overrides and value is not None:
                setattr(config, key, value)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise RecipeError(f"--config_overrides: {config.model_type} configs have no setting {key!r}.")
        setattr(config, key, value)
    for key, value in labels.items():
        setattr(config, key, value)
    try:
        model = AutoModelForImageClassification.from_config(config)
    except ValueError as err:
        raise RecipeError(f"{config.model_type} has no image-classification model: {err}") from err
    size = _size_of(getattr(config, "image_size", None))  # fresh configs got the data's size above
    return BuiltModel(
        model, None, f"{config.model_type} built from {origin}", size, int(config.num_channels), None, None
    )


def accuracy(prediction: Any) -> dict[str, float]:
    """Top-1 accuracy of the logits."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float(np.mean(np.argmax(logits, axis=-1) == prediction.label_ids))}


# ---------------------------------------------------------------------------- main
def check_arguments(model_args: ModelArguments, data_args: DataArguments, args: SmoothOutTrainingArguments) -> None:
    """Everything that can be checked before loading anything."""
    data_args.check()
    if data_args.random_crop_padding < 0:
        raise RecipeError(f"--random_crop_padding must be >= 0, got {data_args.random_crop_padding}.")
    if model_args.image_size is not None and model_args.image_size < 1:
        raise RecipeError(f"--image_size must be a positive integer, got {model_args.image_size}.")
    if args.per_device_eval_batch_size < 1:
        raise RecipeError(f"--per_device_eval_batch_size must be positive, got {args.per_device_eval_batch_size}.")
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        raise RecipeError("Nothing to train: set --num_train_epochs > 0 or --max_steps > 0.")
    if model_args.image_std is not None and any(v <= 0 for v in model_args.image_std):
        raise RecipeError(f"--image_std values must be positive, got {model_args.image_std}.")


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the recipe; returns the evaluation metrics."""
    from transformers import set_seed

    model_args, data_args, protocol, args = parse_args(argv)
    check_arguments(model_args, data_args, args)
    protocol.check()
    plan = plan_from_arguments(args, data_args)
    say(args, describe_environment(args), plan.describe())
    args.remove_unused_columns = False  # the pixel pipeline, not the Trainer, decides what reaches the model

    uses_hub = not (data_args.idx_dir or data_args.train_dir) or (
        model_args.model_name_or_path is not None and not Path(model_args.model_name_or_path).is_dir()
    )
    use_hub = data_args.source == "hub" or (data_args.source == "auto" and uses_hub and hub_reachable())
    request = ImageDataRequest(
        dataset_name=data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        train_split=data_args.train_split,
        eval_split=data_args.eval_split,
        train_dir=data_args.train_dir,
        validation_dir=data_args.validation_dir,
        idx_dir=data_args.idx_dir,
        label_names=data_args.idx_label_names,
        image_column=data_args.image_column,
        label_column=data_args.label_column,
        max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples,
        split_seed=data_args.split_seed,
    )
    data = load_image_data(request, use_hub=use_hub, fashion_mnist_folder=data_args.fashion_mnist_dir)
    shape = f"{data.size[0]}x{data.size[1]}" if data.size else "varying size"
    say(
        args,
        f"data: {data.info['name']}; {len(data.train):,} train / {len(data.eval):,} eval images, {shape}, "
        f"{data.channels} channel(s), {len(data.label_names)} classes",
    )
    set_seed(args.seed)  # fresh weights and the new head are drawn here
    built = build_model(model_args, data, local_only=not use_hub)
    model = built.model
    # The classification loss is a batch mean that ignores num_items_in_batch: keep the Trainer's division by
    # gradient_accumulation_steps (otherwise gradients come out gradient_accumulation_steps x world_size too large).
    model.accepts_loss_kwargs = False
    num_parameters = sum(p.numel() for p in model.parameters())
    size = (model_args.image_size, model_args.image_size) if model_args.image_size else built.size
    if size is None and data.size is None:
        raise RecipeError("The images have different sizes and the model names none: pass --image_size.")
    pipeline = PixelPipeline(built.channels, size, [0.0] * built.channels, [1.0] * built.channels)
    mean, std = model_args.image_mean or built.mean, model_args.image_std or built.std
    if mean is None or std is None:
        mean, std = channel_stats(data.train, pipeline)
    if len(mean) != built.channels or len(std) != built.channels:
        raise RecipeError(f"--image_mean/--image_std need {built.channels} values each, got {mean} and {std}.")
    pipeline.mean, pipeline.std = list(mean), list(std)
    train_pipeline = PixelPipeline(
        built.channels, size, pipeline.mean, pipeline.std, data_args.random_crop_padding, data_args.random_flip, True
    )
    input_size = size or data.size
    assert input_size is not None
    if not given_on_command_line(argv, "per_device_eval_batch_size"):
        args.per_device_eval_batch_size = default_eval_batch_size(input_size, args.per_device_train_batch_size)
        say(
            args,
            f"evaluation batch {args.per_device_eval_batch_size} per device for {input_size[0]}x{input_size[1]} "
            "images (--per_device_eval_batch_size to change)",
        )
    say(
        args,
        f"model: {built.description}; {num_parameters:,} params; input {built.channels}x{input_size[0]}x"
        f"{input_size[1]}, mean {[round(m, 4) for m in mean]}, std {[round(s, 4) for s in std]}",
    )
    train_dataset = PixelDataset(data.train, train_pipeline)
    eval_dataset = PixelDataset(data.eval, pipeline)

    trainer = ProtocolTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        compute_metrics=accuracy,
        protocol=protocol,
    )
    if protocol.describe():
        say(args, f"protocol: {protocol.describe()}")
    config = trainer.smoothout_config
    say(args, f"SmoothOut: {'off (baseline)' if not config.enabled else config.to_dict()}")
    train_result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    train_metrics = {**train_result.metrics, "train_samples": len(train_dataset)}
    eval_metrics = {**trainer.evaluate(), "eval_samples": len(eval_dataset)}
    trainer.log_metrics("train", train_metrics)
    trainer.log_metrics("eval", eval_metrics)

    slug = data.info.get("slug", "images")
    name = (built.base_model or model.config.model_type).split("/")[-1]
    run_info = {
        "model_name": f"{name}-{slug}-{'smoothout' if config.enabled else 'baseline'}",
        "base_model": built.base_model,
        "init_from": model_args.model_name_or_path if built.base_model is None else None,
        "model_source": built.description,
        "model_type": model.config.model_type,
        "num_parameters": num_parameters,
        "dataset": data.info,
        "task": {"type": "image-classification", "name": "Image Classification"},
        "smoothout": config.to_dict(),
        "primary_metric": "eval_accuracy",
        "compare_to": data_args.compare_to,
        "training": {
            "lr_scaling": plan.lr_scaling,
            "base_learning_rate": plan.base_learning_rate,
            "reference_batch_size": plan.reference_batch_size,
            "protocol": protocol.describe(),
            "augmentation": {
                "random_crop_padding": data_args.random_crop_padding,
                "random_flip": data_args.random_flip,
            },
            "image_mean": pipeline.mean,
            "image_std": pipeline.std,
        },
    }
    processed = None
    if data_args.save_processed_data and trainer.is_world_process_zero():
        processed = {"train": processed_dataset(data.train, pipeline), "eval": processed_dataset(data.eval, pipeline)}
    command = ["recipes/image_classification.py", *(argv if argv is not None else sys.argv[1:])]
    finish_run(trainer, train_metrics, eval_metrics, run_info, processed, command)
    del trainer, model
    close_distributed()
    return eval_metrics


if __name__ == "__main__":
    run_cli(main)
