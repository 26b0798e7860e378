"""What a run was, in ``smoothout_run.json``: the `RunInfo` record, its atomic file I/O, and what a Trainer knows.

Every run directory holds ``smoothout_run.json`` (written by `write_run_info`) and the Trainer's
``all_results.json``; the model card (`hf_smoothout.modelcard.card`) is rendered from both.

Example:
    >>> info = RunInfo.from_dict({"model_name": "demo", "smoothout": {"strength": 0.01}, "my_key": 1})
    >>> info.model_name, info.extra
    ('demo', {'my_key': 1})
    >>> info.to_dict()["my_key"]
    1
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUN_INFO_FILE = "smoothout_run.json"
RESULTS_FILE = "all_results.json"
CARD_FILE = "README.md"
ANALYSIS_DIR = "analysis"
SHARPNESS_FILE = "sharpness.json"
STUDY_FILE = "smoothout_study.json"


@dataclass
class RunInfo:
    """One run as its model card describes it (all fields optional; unknown keys are kept in ``extra``).

    ``dataset``: ``name``, ``hub_id``, ``config``, ``train_split``, ``eval_splits``, ``eval_prefixes``, ``num_train``,
    ``num_eval``, ``notes``; ``task``: ``type``, ``name``; ``training``: see `training_info_from_args`;
    ``smoothout``: `SmoothOutConfig.to_dict`.
    """

    model_name: str | None = None
    base_model: str | None = None
    init_from: str | None = None
    model_source: str | None = None
    model_type: str | None = None
    model_notes: str | None = None
    num_parameters: int | None = None
    dataset: dict[str, Any] = field(default_factory=dict)
    task: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    smoothout: dict[str, Any] | None = None
    primary_metric: str | None = None
    compare_to: str | None = None
    command: str | list[str] | None = None
    language: str | list[str] | None = None
    license: str | None = None
    library_name: str | None = None
    tags: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunInfo:
        """A `RunInfo` from the ``smoothout_run.json`` layout (its ``format``/``version`` keys dropped)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names and v is not None}
        extra = {k: v for k, v in data.items() if k not in names and k not in {"format", "version"}}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The ``smoothout_run.json`` layout: every field that is set, and ``extra``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out = {k: v for k, v in out.items() if v not in (None, {}, [])}
        return {**out, **self.extra}

    def get(self, dotted: str) -> Any:
        """A value by dotted path (``"training.seed"``), or ``None``."""
        value: Any = self.to_dict()
        for part in dotted.split("."):
            if not isinstance(value, Mapping) or part not in value:
                return None
            value = value[part]
        return value


# ---------------------------------------------------------------------------- files


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename.

    A crash leaves either the old file or the new one, never half of it. The file gets the
    permissions of any new file (``0666`` minus the umask), as ``open(path, "w")`` would.

    Example:
        >>> import tempfile, pathlib
        >>> p = atomic_write_text(pathlib.Path(tempfile.mkdtemp()) / "a.txt", "hi")
        >>> p.read_text()
        'hi'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode 0666 minus the user's umask
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_run_info(output_dir: str | os.PathLike[str], info: Mapping[str, Any]) -> Path:
    """Write ``smoothout_run.json`` (atomically) and return its path.

    Recognised keys (all optional): ``model_name``, ``base_model`` (Hub id or ``None`` when trained
    from scratch), ``model_source``, ``model_type``, ``model_notes``, ``num_parameters``,
    ``dataset`` (``name``, ``hub_id``, ``config``, ``train_split``, ``eval_splits``, ``num_train``,
    ``num_eval``, ``notes``), ``task`` (``type``, ``name``), ``training`` (see
    `training_info_from_args`), ``smoothout`` (`SmoothOutConfig.to_dict`), ``primary_metric``,
    ``compare_to``, ``command``, ``language``, ``license``, ``tags``.
    """
    payload = {"format": "hf-smoothout-run", "version": 1, **info}
    return atomic_write_text(Path(output_dir) / RUN_INFO_FILE, json.dumps(payload, indent=2, default=str) + "\n")


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or ``None`` when the file does not exist."""
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object.")
    return data


def read_run(run_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(run_info, results)`` of a run directory; raises a clear error when neither file is there."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"Run directory {run_dir} does not exist.")
    info = read_json(run_dir / RUN_INFO_FILE)
    results = read_json(run_dir / RESULTS_FILE)
    if info is None and results is None:
        raise FileNotFoundError(
            f"{run_dir} holds neither {RUN_INFO_FILE} nor {RESULTS_FILE}: it is not the output_dir of a finished run."
        )
    return info or {}, results or {}


# ---------------------------------------------------------------------------- run info from a Trainer
def training_info_from_args(args: Any, global_step: int | None = None) -> dict[str, Any]:
    """Batch, learning-rate and optimizer settings of `TrainingArguments` (for ``run_info["training"]``).

    Example:
        >>> from transformers import TrainingArguments
        >>> info = training_info_from_args(TrainingArguments("out", per_device_train_batch_size=8,
        ...                                                  gradient_accumulation_steps=4))
        >>> info["effective_batch_size"]
        32
    """
    world = int(getattr(args, "world_size", 1) or 1)
    per_device = int(args.per_device_train_batch_size)
    accumulation = int(args.gradient_accumulation_steps)
    mixed = "bf16" if args.bf16 else "fp16" if args.fp16 else getattr(args, "mixed_precision", None) or "no"
    scheduler = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    optimizer = getattr(args.optim, "value", args.optim)
    return {
        "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": accumulation,
        "world_size": world,
        "effective_batch_size": per_device * accumulation * world,
        "learning_rate": float(args.learning_rate),
        "optimizer": str(optimizer),
        "weight_decay": float(args.weight_decay),
        "lr_scheduler_type": str(scheduler),
        "warmup_steps": args.warmup_steps,
        "max_grad_norm": args.max_grad_norm,
        "num_train_epochs": float(args.num_train_epochs),
        "max_steps": int(args.max_steps),
        "global_step": global_step,
        "seed": int(args.seed),
        "mixed_precision": str(mixed),
    }


def run_info_from_trainer(trainer: Any, **overrides: Any) -> dict[str, Any]:
    """What a Trainer knows about its run, in the ``smoothout_run.json`` layout; ``overrides`` win.

    Used by `SmoothOutTrainer.create_model_card` when a script did not write ``smoothout_run.json``.
    """
    model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
    config = getattr(model, "config", None)
    name_or_path = getattr(config, "_name_or_path", "") or None
    base_model = name_or_path if name_or_path and not os.path.isdir(name_or_path) else None
    smoothout = getattr(trainer, "smoothout_config", None)
    dataset = getattr(trainer, "train_dataset", None)
    info: dict[str, Any] = {
        "model_name": Path(trainer.args.output_dir).name,
        "base_model": base_model,
        "model_type": getattr(config, "model_type", None),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "dataset": {"num_train": len(dataset)} if hasattr(dataset, "__len__") else {},
        "training": training_info_from_args(trainer.args, trainer.state.global_step),
        "smoothout": smoothout.to_dict() if smoothout is not None else None,
    }
    info.update({k: v for k, v in overrides.items() if v is not None})
    return info
