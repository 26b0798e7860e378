"""Options both recipes share; each recipe's ``DataArguments`` extends `RunOptions`.

Example:
    >>> from transformers import HfArgumentParser
    >>> (opts,) = HfArgumentParser(RunOptions).parse_args_into_dataclasses(["--lr_scaling", "sqrt"])
    >>> opts.lr_scaling
    'sqrt'
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import RecipeError


@dataclass
class RunOptions:
    """Sample limits, data source, learning-rate scaling, processed-data export and baseline comparison."""

    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many training examples (a seeded random subset)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many evaluation examples per evaluation split."}
    )
    source: Literal["auto", "hub", "offline"] = field(
        default="auto",
        metadata={
            "help": "Where the default data/model come from. auto: the Hub when reachable, else the offline "
            "stand-ins (for the defaults only); hub: never fall back; offline: use the stand-ins without asking "
            "the Hub."
        },
    )
    split_seed: int = field(
        default=42,
        metadata={
            "help": "Seed of data subsampling and of splits made here (kept apart from --seed so that runs "
            "with different training seeds see the same data)."
        },
    )
    lr_scaling: Literal["sqrt", "linear", "none"] = field(
        default="none",
        metadata={
            "help": "Large-batch learning-rate rule: lr * (B/b0)**0.5 (sqrt, the SmoothOut authors' default) or "
            "lr * B/b0 (linear), with B the effective batch and b0 --reference_batch_size."
        },
    )
    reference_batch_size: int | None = field(
        default=None, metadata={"help": "b0 of --lr_scaling: the batch size --learning_rate was tuned for."}
    )
    save_processed_data: bool = field(
        default=False,
        metadata={
            "help": "Save the processed train/eval datasets under <output_dir>/data/{train,eval} "
            "(Dataset.save_to_disk), e.g. for `hf-smoothout sharpness --dataset`."
        },
    )
    compare_to: str | None = field(
        default=None,
        metadata={
            "help": "output_dir of a baseline run (e.g. --smoothout_strength 0): the model card shows both "
            "side by side."
        },
    )

    def check(self) -> None:
        """Raise `RecipeError` for nonsense values (called before anything is loaded or written)."""
        for name in ("max_train_samples", "max_eval_samples", "reference_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RecipeError(f"--{name} must be a positive integer, got {value}.")
        if self.compare_to is not None:
            folder = Path(self.compare_to)
            if not (folder / "all_results.json").is_file():
                raise RecipeError(
                    f"--compare_to {self.compare_to}: no all_results.json there; pass the output_dir of a finished "
                    "run (e.g. the same command with --smoothout_strength 0)."
                )


class RecipeHelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each option's help; description and examples kept as written."""


def recipe_parser(dataclass_types: tuple[type, ...], doc: str) -> Any:
    """An ``HfArgumentParser`` whose ``--help`` opens with ``doc``'s text and ends with its ``Usage:`` examples.

    Example:
        >>> doc = "Train a thing.\n\nMore words.\n\nUsage:\n    python thing.py --output_dir out\n"
        >>> parser = recipe_parser((RunOptions,), doc)
        >>> parser.description.splitlines()[0], parser.epilog.splitlines()[0]
        ('Train a thing.', 'examples:')
    """
    from transformers import HfArgumentParser

    text, _, usage = doc.partition("Usage:")
    epilog = "examples:\n" + usage.rstrip() if usage.strip() else None
    return HfArgumentParser(
        dataclass_types,
        usage="%(prog)s --output_dir DIR [options]   (every option is listed below)",
        description=text.strip(),
        epilog=epilog,
        formatter_class=RecipeHelpFormatter,
    )


def given_on_command_line(argv: list[str] | None, name: str) -> bool:
    """Whether ``--name`` (or ``--name-with-dashes``) appears in ``argv`` (default: ``sys.argv[1:]``).

    Example:
        >>> given_on_command_line(["--per-device-eval-batch-size=64"], "per_device_eval_batch_size")
        True
    """
    import sys

    args = sys.argv[1:] if argv is None else argv
    spellings = {f"--{name}", f"--{name.replace('_', '-')}"}
    return any(arg.split("=", 1)[0] in spellings for arg in args)


def pin_memory_only_where_it_helps(training_args: Any, argv: list[str] | None) -> None:
    """Turn the Trainer's default ``dataloader_pin_memory=True`` off when no CUDA device is there (pinning only
    helps host-to-GPU copies, and torch warns about it on the CPU); an explicit ``--dataloader_pin_memory`` wins.

    Example:
        >>> from types import SimpleNamespace
        >>> args = SimpleNamespace(dataloader_pin_memory=True, use_cpu=True)
        >>> pin_memory_only_where_it_helps(args, []); args.dataloader_pin_memory
        False
    """
    import torch

    if given_on_command_line(argv, "dataloader_pin_memory"):
        return
    if getattr(training_args, "use_cpu", False) or not torch.cuda.is_available():
        training_args.dataloader_pin_memory = False


SMALL_IMAGE_PIXELS = 64 * 64
SMALL_IMAGE_EVAL_BATCH = 1024


def default_eval_batch_size(image_size: tuple[int, int] | None, train_batch_size: int) -> int:
    """Per-device evaluation batch when none is given: 1024 for images up to 64x64 pixels (evaluation keeps no
    activations for a backward pass, and small images are cheap), else twice the training batch.

    Example:
        >>> default_eval_batch_size((28, 28), 32), default_eval_batch_size((224, 224), 32)
        (1024, 64)
    """
    if image_size is not None and image_size[0] * image_size[1] <= SMALL_IMAGE_PIXELS:
        return SMALL_IMAGE_EVAL_BATCH
    return max(8, 2 * train_batch_size)
