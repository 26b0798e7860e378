"""``hf-smoothout``: sharpness measures and loss landscapes of saved models, from the command line.

Subcommands:

* ``hf-smoothout sharpness --model DIR --dataset DIR [...]`` writes ``sharpness.json``;
* ``hf-smoothout landscape --model-a DIR --model-b DIR --dataset DIR [...]`` (linear interpolation) or
  ``hf-smoothout landscape --model DIR --directions random --dataset DIR [...]`` (random
  filter-normalized directions, 1-D and/or 2-D) writes ``landscape_<kind>.png/.csv/.json`` with
  ``<kind>`` in ``interpolation``, ``random_1d``, ``random_2d``.

Models are folders loadable with ``AutoModelForSequenceClassification`` or
``AutoModelForImageClassification`` (``--task``); datasets are folders written by
``datasets.Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``: ``--split``) holding model-ready
columns (``input_ids``/``attention_mask``/``labels``, ``pixel_values``/``labels``, ...). When the model
folder holds a tokenizer, batches are padded with it. Output goes to ``<model dir>/analysis/`` unless
``--output-dir`` is given. ``hf-smoothout <subcommand> --help`` documents every option.

Example:
    >>> parser = build_parser()
    >>> args = parser.parse_args(["sharpness", "--model", "m", "--dataset", "d", "--measures", "hessian_top"])
    >>> args.measures, args.max_batches, args.epsilon
    (['hessian_top'], 8, 0.0005)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .analysis.data import model_dataloader
from .analysis.export import ANALYSIS_DIR, save_landscape, save_sharpness
from .analysis.landscape import (
    INTERPOLATION_ALPHAS,
    RANDOM_1D_ALPHAS,
    RANDOM_2D_ALPHAS,
    interpolation_landscape,
    random_landscape,
)
from .analysis.measures import MEASURES, SharpnessOptions, measure_sharpness

TASKS = ("auto", "sequence-classification", "image-classification")
DTYPES = {"auto": None, "float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "vocab.json")
EVAL_SPLITS = ("validation", "valid", "test")


# --------------------------------------------------------------------------- parser
class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks; appends ``(default: ...)`` where a help text names no default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _add_common(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True, help="folder written by datasets' save_to_disk (model-ready columns)")
    data.add_argument("--split", default="train", help="split to use when --dataset holds a DatasetDict")
    data.add_argument("--batch-size", type=int, default=32, help="examples per batch")
    data.add_argument(
        "--max-batches", type=int, default=8, help="batches of the dataset used by every loss evaluation (bounds cost)"
    )
    data.add_argument("--shuffle", action="store_true", help="draw the batches in a seeded random order")
    run = parser.add_argument_group("run")
    run.add_argument("--task", choices=TASKS, default="auto", help="Auto class used to load the model(s)")
    run.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    run.add_argument(
        "--dtype", choices=tuple(DTYPES), default="float32", help="parameter dtype to measure in (auto: as saved)"
    )
    run.add_argument("--seed", type=int, default=0, help="seed of every random draw (and of --shuffle)")
    run.add_argument("--output-dir", default=None, help="where to write the files (default: <model dir>/analysis)")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-smoothout`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="hf-smoothout",
        description="Sharpness measures and loss landscapes of saved Hugging Face models.",
        epilog="Run 'hf-smoothout <subcommand> --help' for the options of a subcommand.",
        formatter_class=_Formatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{sharpness,landscape}")

    sharp = sub.add_parser(
        "sharpness",
        help="sharpness measures of one model -> sharpness.json",
        description=(
            "Measures the sharpness of a model's loss on a dataset and writes <output dir>/sharpness.json.\n"
            "Measures: epsilon (Keskar epsilon-sharpness, full space), epsilon_subspace (in a random\n"
            "--subspace-dim subspace), hessian_top (top Hessian eigenvalue, power iteration),\n"
            "hessian_trace (Hutchinson trace estimate).\n\n"
            "example: hf-smoothout sharpness --model out/ --dataset data/train --max-batches 4"
        ),
        formatter_class=_Formatter,
    )
    sharp.add_argument("--model", required=True, help="model folder (save_pretrained output)")
    sharp.add_argument(
        "--measures",
        nargs="+",
        choices=MEASURES,
        default=["epsilon", "hessian_top", "hessian_trace"],
        metavar="NAME",
        help=f"measures to compute, any of: {', '.join(MEASURES)}",
    )
    keskar = sharp.add_argument_group("epsilon-sharpness")
    keskar.add_argument("--epsilon", type=float, default=5e-4, help="box size: x0 +- epsilon * (|x0| + 1)")
    keskar.add_argument("--iterations", type=int, default=10, help="L-BFGS-B iterations per repeat")
    keskar.add_argument("--subspace-dim", type=int, default=10, help="dimension M of epsilon_subspace")
    keskar.add_argument("--repeats", type=int, default=3, help="random starts/subspaces; reported as mean +- std")
    keskar.add_argument("--center-start", action="store_true", help="start the search at the weights, not at random")
    hessian = sharp.add_argument_group("Hessian")
    hessian.add_argument("--power-iterations", type=int, default=20, help="maximum power iterations of hessian_top")
    hessian.add_argument(
        "--power-tolerance", type=float, default=1e-4, help="relative change that stops the power iteration"
    )
    hessian.add_argument("--trace-samples", type=int, default=10, help="Rademacher vectors of hessian_trace")
    _add_common(sharp)

    land = sub.add_parser(
        "landscape",
        help="1-D/2-D loss landscapes -> landscape_<kind>.png/.csv/.json",
        description=(
            "Loss and accuracy along a line or a plane through weight space; writes\n"
            "landscape_<kind>.png, .csv and .json with <kind> = interpolation, random_1d or random_2d.\n"
            "interpolation: theta(alpha) = alpha * theta_B + (1 - alpha) * theta_A (needs --model-b);\n"
            "random: theta + alpha * d1 (+ beta * d2) along random filter-normalized directions.\n\n"
            "examples:\n"
            "  hf-smoothout landscape --model-a small_batch/ --model-b large_batch/ --dataset data/\n"
            "  hf-smoothout landscape --model out/ --directions random --dims 1 2 --dataset data/"
        ),
        formatter_class=_Formatter,
    )
    land.add_argument(
        "--model-a",
        "--model",
        dest="model_a",
        required=True,
        help="model folder (theta_A; the center theta for random directions)",
    )
    land.add_argument("--model-b", default=None, help="second model folder (theta_B) for --directions interpolation")
    land.add_argument(
        "--directions",
        choices=("interpolation", "random"),
        default=None,
        help="interpolation between --model-a and --model-b, or random filter-normalized directions "
        "(default: interpolation if --model-b is given, else random)",
    )
    land.add_argument("--dims", type=int, nargs="+", choices=(1, 2), default=[1, 2], help="random: 1-D and/or 2-D")
    land.add_argument(
        "--eval-dataset",
        default=None,
        help="validation data folder (default: a validation/valid/test split of --dataset, if any)",
    )
    land.add_argument(
        "--eval-split", default=None, help="split of --eval-dataset when it holds a DatasetDict (default: validation)"
    )
    land.add_argument(
        "--alpha-range",
        type=float,
        nargs=2,
        metavar=("MIN", "MAX"),
        default=None,
        help="range of alpha (and beta); default -1 2 for interpolation, -1 1 for random",
    )
    land.add_argument("--points", type=int, default=None, help="points of a 1-D curve (default 31 interp., 21 random)")
    land.add_argument("--grid-points", type=int, default=RANDOM_2D_ALPHAS[2], help="points per axis of a 2-D grid")
    land.add_argument(
        "--include-one-dim",
        action="store_true",
        help="random: also move biases and normalization parameters (default: zero direction, as Li et al.)",
    )
    land.add_argument("--figure-size", type=float, nargs=2, metavar=("W", "H"), default=(9.6, 6.4), help="inches")
    land.add_argument("--dpi", type=int, default=100, help="PNG resolution (pixels = figure size * dpi)")
    _add_common(land)
    return parser


# --------------------------------------------------------------------------- loading
def load_model(path: str | Path, task: str = "auto", dtype: str = "float32", device: str | None = None) -> nn.Module:
    """Load a model folder with the Auto class of ``task`` (``auto``: sequence, then image classification)."""
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    classes = {
        "sequence-classification": AutoModelForSequenceClassification,
        "image-classification": AutoModelForImageClassification,
    }
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; known: {', '.join(TASKS)}.")
    if not Path(path, "config.json").is_file():
        raise ValueError(f"{path} is not a model folder (no config.json).")
    kwargs: dict[str, Any] = {} if DTYPES[dtype] is None else {"dtype": DTYPES[dtype]}
    errors = []
    for name in classes if task == "auto" else (task,):
        try:
            model = classes[name].from_pretrained(str(path), **kwargs)
            break
        except (ValueError, KeyError, OSError) as error:
            errors.append(f"{name}: {error}")
    else:
        raise ValueError(f"Could not load {path} as a classification model ({'; '.join(errors)}).")
    if DTYPES[dtype] is not None:
        model = model.to(DTYPES[dtype])
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_tokenizer(path: str | Path) -> Any | None:
    """The tokenizer saved in a model folder, or ``None`` (no tokenizer files: never reaches the Hub)."""
    if not any(Path(path, name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (ValueError, OSError, KeyError):
        return None


def load_split(path: str | Path, split: str | None) -> tuple[Any, str | None]:
    """The dataset saved in ``path`` and the split used (``None`` for a plain ``Dataset``)."""
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except FileNotFoundError as error:
        raise ValueError(f"{path} is not a dataset folder written by save_to_disk ({error}).") from error
    if isinstance(data, DatasetDict):
        if split is None or split not in data:
            raise ValueError(f"{path} holds splits {sorted(data)}; choose one with a valid split name, not {split!r}.")
        data = data[split]
    else:
        split = None
    if len(data) == 0:
        raise ValueError(f"The dataset in {path} is empty.")
    return data, split


def _eval_split_of(path: str | Path, train_split: str) -> str | None:
    from datasets import DatasetDict, load_from_disk

    data = load_from_disk(str(path))
    if isinstance(data, DatasetDict):
        return next((s for s in EVAL_SPLITS if s in data and s != train_split), None)
    return None


def _loader(dataset: Any, model: nn.Module, tokenizer: Any, args: argparse.Namespace) -> Any:
    return model_dataloader(
        dataset, model, batch_size=args.batch_size, tokenizer=tokenizer, shuffle=args.shuffle, seed=args.seed
    )


def _check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")


# --------------------------------------------------------------------------- commands
def run_sharpness(args: argparse.Namespace) -> dict[str, Path]:
    """The ``sharpness`` subcommand; returns ``{"sharpness": path}``."""
    model = load_model(args.model, args.task, args.dtype, args.device)
    dataset, split = load_split(args.dataset, args.split)
    loader = _loader(dataset, model, load_tokenizer(args.model), args)
    options = SharpnessOptions(
        epsilon=args.epsilon,
        epsilon_iterations=args.iterations,
        subspace_dim=args.subspace_dim,
        repeats=args.repeats,
        random_start=not args.center_start,
        power_iterations=args.power_iterations,
        power_tolerance=args.power_tolerance,
        trace_samples=args.trace_samples,
        max_batches=args.max_batches,
        seed=args.seed,
    )
    results = {}
    for measure in dict.fromkeys(args.measures):
        results[measure] = measure_sharpness(model, loader, measure, options, progress=not args.no_progress)
        print(f"{measure}: {results[measure].value:.6g} +- {results[measure].std:.3g}")
    output = Path(args.output_dir) if args.output_dir else Path(args.model) / ANALYSIS_DIR
    path = save_sharpness(
        results,
        output,
        model=str(args.model),
        dataset=str(args.dataset),
        split=split,
        task=args.task,
        device=str(next(model.parameters()).device),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        batch_size=args.batch_size,
        shuffle=args.shuffle,
        options=options.to_dict(),
    )
    print(f"wrote {path}")
    return {"sharpness": path}


def _grid(args: argparse.Namespace, default: tuple[float, float, int], points: int | None) -> list[float]:
    low, high = args.alpha_range if args.alpha_range is not None else default[:2]
    return [float(v) for v in torch.linspace(low, high, points or default[2], dtype=torch.float64)]


def run_landscape(args: argparse.Namespace) -> dict[str, Path]:
    """The ``landscape`` subcommand; returns ``{"<kind>_<ext>": path}``."""
    directions = args.directions or ("interpolation" if args.model_b else "random")
    if directions == "interpolation" and not args.model_b:
        raise ValueError("--directions interpolation needs --model-b.")
    if directions == "random" and args.model_b:
        raise ValueError("--model-b is only used with --directions interpolation.")
    model = load_model(args.model_a, args.task, args.dtype, args.device)
    tokenizer = load_tokenizer(args.model_a)
    train, split = load_split(args.dataset, args.split)
    loaders = {"train": _loader(train, model, tokenizer, args)}
    if args.eval_dataset:
        evaluation, _ = load_split(args.eval_dataset, args.eval_split or "validation")
        loaders["validation"] = _loader(evaluation, model, tokenizer, args)
    elif split is not None and (eval_split := _eval_split_of(args.dataset, split)) is not None:
        loaders["validation"] = _loader(load_split(args.dataset, eval_split)[0], model, tokenizer, args)
    common = {"max_batches": args.max_batches, "progress": not args.no_progress}
    results = []
    if directions == "interpolation":
        model_b = load_model(args.model_b, args.task, args.dtype, args.device)
        alphas = _grid(args, INTERPOLATION_ALPHAS, args.points)
        results.append(interpolation_landscape(model, model_b, loaders, alphas=alphas, **common))
    else:
        for dims in dict.fromkeys(args.dims):
            default = RANDOM_1D_ALPHAS if dims == 1 else RANDOM_2D_ALPHAS
            grid = _grid(args, default, args.points if dims == 1 else args.grid_points)
            betas = grid if dims == 2 else None
            results.append(
                random_landscape(
                    model,
                    loaders,
                    dims=dims,
                    alphas=grid,
                    betas=betas,
                    seed=args.seed,
                    include_one_dim=args.include_one_dim,
                    **common,
                )
            )
    output = Path(args.output_dir) if args.output_dir else Path(args.model_a) / ANALYSIS_DIR
    written = {}
    for result in results:
        result.info.update(model_a=str(args.model_a), model_b=args.model_b, dataset=str(args.dataset))
        paths = save_landscape(result, output, figure_size=tuple(args.figure_size), dpi=args.dpi)
        for ext, path in paths.items():
            written[f"{result.kind}_{ext}"] = path
            print(f"wrote {path}")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hf-smoothout``; returns the exit status (errors exit with status 2 and a message)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_positive(parser, args, "batch_size", "max_batches", "iterations", "subspace_dim", "repeats")
    _check_positive(parser, args, "power_iterations", "trace_samples", "points", "grid_points", "dpi")
    try:
        if args.command == "sharpness":
            run_sharpness(args)
        else:
            run_landscape(args)
    except ValueError as error:
        parser.exit(2, f"hf-smoothout {args.command}: error: {error}\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
