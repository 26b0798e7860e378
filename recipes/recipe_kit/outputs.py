"""What a finished recipe run writes to ``output_dir``, and the log lines it prints on the way.

Order: model, metrics (``train_results.json``, ``eval_results.json``, ``all_results.json``), trainer
state, processed datasets (``data/{train,eval}``, when asked), ``smoothout_run.json`` and the model card
``README.md``; files of our own are written through a temporary name and renamed.

Example:
    >>> finish_run(trainer, train_metrics, eval_metrics, run_info, processed=None)  # doctest: +SKIP
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from hf_smoothout.modelcard import RESULTS_FILE, training_info_from_args, write_run_info

PROCESSED_DIR = "data"


def say(args: Any, *lines: str) -> None:
    """Print on the main process only (one copy of each line under ``torchrun``/``accelerate launch``)."""
    if getattr(args, "process_index", 0) == 0:
        for line in lines:
            print(line, flush=True)


def mixed_precision(args: Any) -> str:
    """``bf16``, ``fp16`` or ``no``: the flags, else what ``accelerate launch`` passes from its config."""
    if args.bf16:
        return "bf16"
    if args.fp16:
        return "fp16"
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no")


def describe_environment(args: Any) -> str:
    """World size, device and mixed precision, e.g. ``world size 2 (processes), device cpu, mixed precision no``."""
    return (
        f"world size {args.world_size} (processes), device {args.device.type}, mixed precision {mixed_precision(args)}"
    )


def save_processed(datasets: dict[str, Any], output_dir: str | os.PathLike[str]) -> list[Path]:
    """``Dataset.save_to_disk`` of each split under ``output_dir/data/<name>`` (written aside, then renamed)."""
    root = Path(output_dir) / PROCESSED_DIR
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for name, dataset in datasets.items():
        target = root / name
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        try:
            dataset.save_to_disk(str(staging / name))
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging / name, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        written.append(target)
    return written


def finish_run(
    trainer: Any,
    train_metrics: dict[str, Any],
    eval_metrics: dict[str, Any],
    run_info: dict[str, Any],
    processed: dict[str, Any] | None = None,
    command: list[str] | None = None,
) -> None:
    """Save model, metrics, state, processed data, run info and model card; push to the Hub if asked.

    ``command``: the script and its arguments, for the card's "How to reproduce" (default: ``sys.argv``).
    """
    args = trainer.args
    trainer.save_model()  # every process calls it; only the main one writes
    if trainer.is_world_process_zero():
        stale = Path(args.output_dir) / RESULTS_FILE
        if stale.exists():
            stale.unlink()  # save_metrics merges into an existing file: start from this run's numbers only
        trainer.save_metrics("train", train_metrics)
        trainer.save_metrics("eval", eval_metrics)
        trainer.save_state()
        if processed:
            for path in save_processed(processed, args.output_dir):
                say(args, f"processed data: {path}")
        training = {**training_info_from_args(args, trainer.state.global_step), **run_info.pop("training", {})}
        write_run_info(args.output_dir, {**run_info, "training": training, "command": launch_command(args, command)})
        trainer.create_model_card(compare_to=run_info.get("compare_to"))
        say(args, f"model card: {Path(args.output_dir) / 'README.md'}")
    if args.push_to_hub:
        trainer.push_to_hub(compare_to=run_info.get("compare_to"))


def launch_command(args: Any, command: list[str] | None = None) -> list[str]:
    """The command line of this run, for the model card (``python`` or ``accelerate launch`` prefix)."""
    command = list(command) if command is not None else list(sys.argv)
    if args.world_size > 1:
        return ["accelerate", "launch", "--multi_gpu", f"--num_processes={args.world_size}", *command]
    return ["python", *command]


def close_distributed() -> None:
    """Tear down the process group (gloo can hang at exit otherwise); call after ``del trainer, model``."""
    gc.collect()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
