"""Hub model cards for SmoothOut runs: results, SmoothOut hyperparameters, baseline comparison, sharpness.

Every run directory holds ``smoothout_run.json`` (what was trained: base model, dataset, effective
batch, learning rate, SmoothOut settings; written by `write_run_info`) and the Trainer's
``all_results.json``. `write_model_card` turns them into ``README.md``: YAML metadata (tags,
``base_model``, datasets, ``model-index``) and text. With a baseline run directory (``compare_to``)
the card shows both runs side by side with the difference. If ``<run>/analysis/`` holds
``sharpness.json`` or ``landscape_*.png`` (from the analysis tools), the card reports them too, so
re-run it after the analysis. A study that trained the run among others puts its results table in
``smoothout_study.json`` (`write_study_rows`), and the card shows that table with the run's own row
marked:

    python -m hf_smoothout.modelcard OUTPUT_DIR [--compare_to BASELINE_DIR] [--print_table]

Example:
    >>> import json, tempfile, pathlib
    >>> run = pathlib.Path(tempfile.mkdtemp())
    >>> _ = write_run_info(run, {"model_name": "demo", "smoothout": {"strength": 0.01, "adapt": "filter"}})
    >>> _ = (run / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.9}))
    >>> "smoothout" in write_model_card(run).read_text()
    True
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

RUN_INFO_FILE = "smoothout_run.json"
RESULTS_FILE = "all_results.json"
CARD_FILE = "README.md"
ANALYSIS_DIR = "analysis"
SHARPNESS_FILE = "sharpness.json"
STUDY_FILE = "smoothout_study.json"
PAPER = "[SmoothOut](https://arxiv.org/abs/1805.07898) (Wen et al., 2018)"
BASE_TAGS = ("smoothout", "generated_from_trainer")

# Keys of all_results.json that are bookkeeping, not results.
_BOOKKEEPING_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second", "_samples", "total_flos", "epoch")
# Metric names the Hub knows (model-index ``type``), keyed by the suffix of an ``eval_*`` key.
_HUB_METRIC_TYPES = {
    "accuracy": "accuracy",
    "f1": "f1",
    "matthews_correlation": "matthews_correlation",
    "pearson": "pearsonr",
    "spearmanr": "spearmanr",
    "precision": "precision",
    "recall": "recall",
}
# Settings compared between a run and its baseline, with a label for the card.
_COMPARED_SETTINGS = {
    "base_model": "base model",
    "model_type": "architecture",
    "num_parameters": "parameters",
    "dataset.name": "dataset",
    "dataset.num_train": "training examples",
    "dataset.num_eval": "evaluation examples",
    "training.effective_batch_size": "effective batch",
    "training.learning_rate": "learning rate",
    "training.num_train_epochs": "epochs",
    "training.max_steps": "max steps",
    "training.global_step": "optimizer steps",
    "training.seed": "seed",
}


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


# ---------------------------------------------------------------------------- formatting helpers
def _get(mapping: Mapping[str, Any], dotted: str) -> Any:
    value: Any = mapping
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def format_value(value: Any) -> str:
    """Numbers with 4 significant decimals, the rest as text (markdown-safe pipes)."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)  # years, seeds and small counts stay plain
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.4g}"
        return f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value) if value else "[]"
    return str(value).replace("|", "\\|")


def format_setting(value: Any) -> str:
    """A hyperparameter as written on a command line: ``0.01``, ``10``, ``True``, ``a, b``."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_setting(v) for v in value) if value else "[]"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={format_setting(v)}" for k, v in value.items())
    return format_value(value)


def format_difference(new: Any, old: Any) -> str:
    """``new - old`` with a sign and the same 4 decimals as the values beside it, or an empty cell.

    Example:
        >>> format_difference(0.8506208, 0.85), format_difference(0.84, 0.85), format_difference("a", 1.0)
        ('+0.0006', '-0.0100', '')
    """
    numeric = (int, float)
    if isinstance(new, bool) or isinstance(old, bool) or not isinstance(new, numeric) or not isinstance(old, numeric):
        return ""
    diff = float(new) - float(old)
    if math.isnan(diff):
        return ""
    if isinstance(new, int) and isinstance(old, int):
        return f"{int(diff):+,}"
    return f"{diff:+.4f}" if abs(diff) < 1e5 else f"{diff:+.4g}"


def markdown_table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def result_metrics(results: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers of ``all_results.json`` worth reporting (not run times, throughputs, counts or epochs).

    Order: evaluation metrics (``eval*``/``test*``), other measures (e.g. a held-out split, training
    accuracy), evaluation losses, then the training loss.
    """
    metrics = {
        key: value
        for key, value in results.items()
        if not key.endswith(_BOOKKEEPING_SUFFIXES) and isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    evals = sorted(k for k in metrics if k.startswith(("eval", "test")) and not k.endswith("_loss"))
    others = sorted(k for k in metrics if k not in evals and not k.endswith("_loss"))
    losses = sorted(k for k in metrics if k.endswith("_loss") and k != "train_loss")
    order = evals + others + losses + (["train_loss"] if "train_loss" in metrics else [])
    return {k: metrics[k] for k in order}


def metric_label(key: str) -> str:
    """``eval_accuracy`` -> ``accuracy``; ``eval_mismatched_accuracy`` -> ``mismatched accuracy``."""
    for prefix in ("eval_", "test_"):
        if key.startswith(prefix):
            key = key[len(prefix) :] if prefix == "eval_" else "test " + key[len(prefix) :]
            break
    return key.replace("_", " ")


def describe_smoothout(settings: Mapping[str, Any] | None) -> str:
    """One-line summary such as ``SmoothOut a=0.01 (filter, uniform, constant)`` or ``SmoothOut off``.

    Example:
        >>> describe_smoothout({"strength": 0.05, "adapt": "filter_std", "distribution": "gaussian",
        ...                     "schedule": "cosine", "space": "lora_merged"})
        'SmoothOut a=0.05 (filter_std, gaussian, cosine, on the merged LoRA weights)'
    """
    if not settings or not float(settings.get("strength", 0) or 0) > 0:
        return "SmoothOut off"
    name = "AdaSmoothOut" if settings.get("adapt") == "filter" else "SmoothOut"
    details = [str(settings.get(k)) for k in ("adapt", "distribution", "schedule") if settings.get(k) is not None]
    extra = f", {settings['samples']} samples" if int(settings.get("samples", 1) or 1) > 1 else ""
    if settings.get("space") == "lora_merged":
        extra += ", on the merged LoRA weights"
    return f"{name} a={float(settings['strength']):g} ({', '.join(details)}{extra})"


def _arm_label(info: Mapping[str, Any], fallback: str) -> str:
    settings = info.get("smoothout")
    if not info:
        return fallback
    return (
        "baseline (SmoothOut off)" if describe_smoothout(settings) == "SmoothOut off" else describe_smoothout(settings)
    )


# ---------------------------------------------------------------------------- sections
def comparison_rows(results: Mapping[str, Any], baseline_results: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    """``(metric, baseline, this run, difference)`` for every metric both runs report."""
    mine, theirs = result_metrics(results), result_metrics(baseline_results)
    return [
        (metric_label(key), format_value(theirs[key]), format_value(value), format_difference(value, theirs[key]))
        for key, value in mine.items()
        if key in theirs
    ]


def comparison_table(run_dir: str | os.PathLike[str], baseline_dir: str | os.PathLike[str]) -> str:
    """Markdown table of a run against a baseline run (columns labelled with their SmoothOut settings).

    Example:
        >>> comparison_table("outputs/smoothout", "outputs/baseline")  # doctest: +SKIP
        | metric | baseline (SmoothOut off) | AdaSmoothOut a=0.01 (filter, uniform, constant) | difference |
    """
    info, results = read_run(run_dir)
    base_info, base_results = read_run(baseline_dir)
    rows = comparison_rows(results, base_results)
    if not rows:
        raise ValueError(f"{run_dir} and {baseline_dir} report no metric in common.")
    header = ["metric", _arm_label(base_info, "baseline"), _arm_label(info, "this run"), "difference"]
    return markdown_table(header, rows)


def settings_differences(info: Mapping[str, Any], baseline_info: Mapping[str, Any]) -> list[str]:
    """Human-readable list of the compared settings in which the two runs differ (SmoothOut aside)."""
    differences = []
    for key, label in _COMPARED_SETTINGS.items():
        mine, theirs = _get(info, key), _get(baseline_info, key)
        if mine is not None and theirs is not None and mine != theirs:
            differences.append(f"{label}: {format_value(theirs)} (baseline) vs {format_value(mine)} (this run)")
    return differences


def flatten_numbers(data: Any, prefix: str = "") -> dict[str, Any]:
    """Scalars of a nested JSON object keyed by dotted path; a list of numbers becomes ``mean ± std (n)``.

    Example:
        >>> flatten_numbers({"epsilon": {"mean": 1.5, "values": [1.0, 2.0]}})
        {'epsilon.mean': 1.5, 'epsilon.values': '1.5000 ± 0.5000 (n=2)'}
    """
    out: dict[str, Any] = {}
    if isinstance(data, Mapping):
        for key, value in data.items():
            out.update(flatten_numbers(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(data, (list, tuple)):
        numbers = [v for v in data if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if data and len(numbers) == len(data):
            mean = sum(numbers) / len(numbers)
            std = math.sqrt(sum((v - mean) ** 2 for v in numbers) / len(numbers))
            out[prefix] = f"{format_value(float(mean))} ± {format_value(float(std))} (n={len(numbers)})"
        elif data and len(data) <= 10:
            for i, value in enumerate(data):
                out.update(flatten_numbers(value, f"{prefix}[{i}]"))
        elif data:
            out[prefix] = f"list of {len(data)} items"
    elif data is not None:
        out[prefix] = data
    return out


def _measure_rows(
    measures: Mapping[str, Any], baseline: Mapping[str, Any] | None
) -> tuple[list[str], list[tuple[str, ...]]]:
    """Rows of the ``measures`` of ``sharpness.json`` (each with ``value`` and ``std``), optionally vs a baseline."""

    def cell(result: Any) -> str:
        if not isinstance(result, Mapping) or "value" not in result:
            return ""
        std = result.get("std")
        spread = f" ± {format_value(std)}" if isinstance(std, (int, float)) and std else ""
        return f"{format_value(result['value'])}{spread}"

    if baseline is None:
        return ["measure", "value"], [(name, cell(result)) for name, result in measures.items()]
    rows = []
    for name, result in measures.items():
        other = baseline.get(name)
        mine_value = result.get("value") if isinstance(result, Mapping) else None
        base_value = other.get("value") if isinstance(other, Mapping) else None
        rows.append((name, cell(other), cell(result), format_difference(mine_value, base_value)))
    return ["measure", "baseline", "this run", "difference"], rows


def analysis_section(run_dir: Path, baseline_dir: Path | None) -> str:
    """Sharpness figures and landscape plots from ``<run>/analysis/``; empty when there is none.

    ``sharpness.json`` as the analysis tools write it (``{"measures": {name: {"value", "std", ...}}, ...}``)
    becomes a table of measures; any other JSON object is shown flattened.
    """
    analysis = run_dir / ANALYSIS_DIR
    sharpness = read_json(analysis / SHARPNESS_FILE)
    plots = sorted(analysis.glob("landscape_*.png")) if analysis.is_dir() else []
    if sharpness is None and not plots:
        return ""
    text = "\n## Sharpness and loss landscape\n\n"
    if sharpness is not None:
        base_json = read_json(baseline_dir / ANALYSIS_DIR / SHARPNESS_FILE) if baseline_dir is not None else None
        text += f"From `{ANALYSIS_DIR}/{SHARPNESS_FILE}` (written by the analysis tools of `hf-smoothout`):\n\n"
        measures = sharpness.get("measures")
        if isinstance(measures, Mapping):
            base_measures = base_json.get("measures") if base_json is not None else None
            header, rows = _measure_rows(measures, base_measures if isinstance(base_measures, Mapping) else None)
            text += markdown_table(header, rows)
            context = {k: v for k, v in sharpness.items() if k != "measures"}
            if context:
                text += "\nSettings: " + "; ".join(f"{k}: {format_setting(v)}" for k, v in context.items()) + "\n"
        else:
            mine = flatten_numbers(sharpness)
            base = flatten_numbers(base_json) if base_json is not None else None
            if base:
                rows = [
                    (key, format_value(base.get(key, "")), format_value(value), format_difference(value, base.get(key)))
                    for key, value in mine.items()
                ]
                text += markdown_table(["quantity", "baseline", "this run", "difference"], rows)
            else:
                text += markdown_table(["quantity", "value"], [(k, format_value(v)) for k, v in mine.items()])
    for plot in plots:
        title = plot.stem.removeprefix("landscape_").replace("_", " ")
        text += f"\n**Loss landscape: {title}**\n\n![{plot.stem}]({ANALYSIS_DIR}/{plot.name})\n"
    return text


def _metadata(info: Mapping[str, Any], results: Mapping[str, Any]) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    task = info.get("task") or {}
    dataset = info.get("dataset") or {}
    tags = list(BASE_TAGS)
    for tag in [task.get("type"), *(info.get("tags") or [])]:
        if tag and tag not in tags:
            tags.append(tag)
    if describe_smoothout(info.get("smoothout")) == "SmoothOut off":
        tags.append("smoothout-baseline")
    eval_results = []
    metric_types = []
    splits = dataset.get("eval_splits") or []
    # metric key prefix -> split name (e.g. MNLI: eval -> validation_matched, eval_mismatched -> ..._mismatched)
    prefixes = dataset.get("eval_prefixes") or {"eval": splits[0] if splits else None}
    for key, value in result_metrics(results).items():
        match = next(
            (
                (prefix, key[len(prefix) + 1 :])
                for prefix in sorted(prefixes, key=len, reverse=True)
                if key.startswith(prefix + "_") and key[len(prefix) + 1 :] in _HUB_METRIC_TYPES
            ),
            None,
        )
        if match is None or not task.get("type"):
            continue
        prefix, metric = match
        hub_type = _HUB_METRIC_TYPES[metric]
        eval_results.append(
            EvalResult(
                task_type=task["type"],
                task_name=task.get("name"),
                dataset_type=dataset.get("hub_id") or dataset.get("slug") or "custom",
                dataset_name=dataset.get("name") or "custom",
                dataset_config=dataset.get("config"),
                dataset_split=prefixes[prefix],
                metric_type=hub_type,
                metric_name=metric_label(key),
                metric_value=float(value),
            )
        )
        metric_types.append(hub_type)
    card_data = ModelCardData(
        model_name=info.get("model_name") or "smoothout-model",
        base_model=info.get("base_model") or None,
        datasets=[dataset["hub_id"]] if dataset.get("hub_id") else None,
        library_name=info.get("library_name") or "transformers",
        license=info.get("license"),
        language=info.get("language"),
        pipeline_tag=task.get("type"),
        tags=tags,
        metrics=sorted(set(metric_types)) or None,
        eval_results=eval_results or None,
    )
    return card_data.to_yaml()


def _intro(info: Mapping[str, Any]) -> str:
    name = info.get("model_name") or "SmoothOut model"
    base = info.get("base_model")
    dataset = info.get("dataset") or {}
    data_name = dataset.get("name") or "a custom dataset"
    if dataset.get("hub_id"):
        config = f", config `{dataset['config']}`" if dataset.get("config") else ""
        data_name += f" ([`{dataset['hub_id']}`](https://huggingface.co/datasets/{dataset['hub_id']}){config})"
    notes = f" ({info['model_notes']})" if info.get("model_notes") else ""
    if base:
        start = f"This model is a fine-tuned version of [{base}](https://huggingface.co/{base}){notes} on {data_name}"
    elif info.get("init_from"):
        start = (
            f"This model is a fine-tuned version of the local checkpoint `{info['init_from']}`{notes} on {data_name}"
        )
    else:
        arch = info.get("model_type") or "a model"
        start = f"This model was trained from scratch ({arch} built from a configuration{notes}) on {data_name}"
    settings = info.get("smoothout")
    if describe_smoothout(settings) == "SmoothOut off":
        method = (
            ", with SmoothOut switched off (`smoothout_strength 0`): the plain-training baseline of the same recipe."
        )
    else:
        method = f", with {PAPER} weight-noise smoothing: {describe_smoothout(settings)}."
    return f"\n# {name}\n\n{start}{method}\n"


def _results_section(info: Mapping[str, Any], results: Mapping[str, Any]) -> str:
    metrics = result_metrics(results)
    if not metrics:
        return "\n## Results\n\nNo results recorded (no `all_results.json`).\n"
    primary = info.get("primary_metric")
    rows = [
        (f"**{metric_label(k)}**" if k == primary else metric_label(k), format_value(v)) for k, v in metrics.items()
    ]
    splits = (info.get("dataset") or {}).get("eval_splits")
    where = f" on {', '.join(f'`{s}`' for s in splits)}" if splits else ""
    return f"\n## Results\n\nEvaluation{where} after training:\n\n" + markdown_table(["metric", "value"], rows)


def write_study_rows(
    output_dir: str | os.PathLike[str],
    *,
    title: str,
    description: str,
    header: Iterable[str],
    rows: Iterable[Iterable[str]],
    highlight: int | None = None,
) -> Path:
    """Record the results table of a study that trained this run (``smoothout_study.json``) for its model card.

    ``highlight`` is the index of the row this run belongs to; the card marks it. Re-write the card
    (`write_model_card`) afterwards.

    Example:
        >>> import tempfile
        >>> run = tempfile.mkdtemp()
        >>> path = write_study_rows(run, title="Demo study", description="Two arms, 3 seeds.",
        ...                         header=["method", "accuracy %"], rows=[["baseline", "90.0 ± 0.1"],
        ...                         ["smoothout", "90.2 ± 0.2"]], highlight=1)
        >>> "**smoothout**" in _study_section(Path(run))
        True
    """
    header = [str(h) for h in header]
    table = [[str(cell) for cell in row] for row in rows]
    for row in table:
        if len(row) != len(header):
            raise ValueError(f"Study row {row} has {len(row)} cells; the header has {len(header)}.")
    if highlight is not None and not 0 <= highlight < len(table):
        raise ValueError(f"highlight={highlight} is not a row index (the table has {len(table)} rows).")
    study = {"title": title, "description": description, "header": header, "rows": table, "highlight": highlight}
    return atomic_write_text(Path(output_dir) / STUDY_FILE, json.dumps(study, indent=2, ensure_ascii=False) + "\n")


def _study_section(run_dir: Path) -> str:
    """The study table of ``smoothout_study.json`` with this run's row in bold; empty when there is none."""
    study = read_json(run_dir / STUDY_FILE)
    if study is None:
        return ""
    highlight = study.get("highlight")
    rows = [[f"**{cell}**" if i == highlight and cell else cell for cell in row] for i, row in enumerate(study["rows"])]
    text = f"\n## {study['title']}\n\n{study['description']}\n\n"
    if highlight is not None:
        text += "This model's row is in bold.\n\n"
    return text + markdown_table(study["header"], rows)


def _comparison_section(
    info: Mapping[str, Any], results: Mapping[str, Any], baseline_dir: Path, baseline_info: Mapping[str, Any]
) -> str:
    _, base_results = read_run(baseline_dir)
    rows = comparison_rows(results, base_results)
    header = ["metric", _arm_label(baseline_info, "baseline"), _arm_label(info, "this run"), "difference"]
    text = "\n## Comparison with the baseline\n\n"
    text += f"Baseline run: `{baseline_dir}` ({describe_smoothout(baseline_info.get('smoothout'))}). "
    text += "Difference = this run - baseline (for losses, lower is better).\n\n"
    text += markdown_table(header, rows) if rows else "The two runs report no metric in common.\n"
    differences = settings_differences(info, baseline_info)
    if differences:
        text += "\nThe runs differ in more than SmoothOut:\n\n" + "".join(f"- {d}\n" for d in differences)
    elif baseline_info:
        text += "\nApart from SmoothOut, the runs share model, data, effective batch, learning rate, steps and seed.\n"
    return text


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else format_value(value)


def _data_section(info: Mapping[str, Any]) -> str:
    dataset = info.get("dataset") or {}
    if not dataset:
        return ""
    lines = []
    if dataset.get("name"):
        lines.append(f"- dataset: {dataset['name']}")
    if dataset.get("num_train") is not None:
        split = f" (`{dataset['train_split']}`)" if dataset.get("train_split") else ""
        lines.append(f"- training examples: {_count(dataset['num_train'])}{split}")
    if dataset.get("num_eval") is not None:
        splits = ", ".join(f"`{s}`" for s in dataset.get("eval_splits") or [])
        lines.append(f"- evaluation examples: {_count(dataset['num_eval'])}{f' ({splits})' if splits else ''}")
    if dataset.get("notes"):
        lines.append(f"- {dataset['notes']}")
    return "\n## Training and evaluation data\n\n" + "\n".join(lines) + "\n"


def _procedure_section(info: Mapping[str, Any]) -> str:
    training = info.get("training") or {}
    text = "\n## Training procedure\n"
    if training:
        text += "\n### Batch and learning rate\n\n"
        if training.get("effective_batch_size") is not None:
            text += (
                f"- effective batch size: {training['effective_batch_size']} = "
                f"{training.get('per_device_train_batch_size')} per device x "
                f"{training.get('gradient_accumulation_steps')} gradient accumulation x "
                f"{training.get('world_size')} process{'es' if training.get('world_size') != 1 else ''}\n"
            )
        lr_line = f"- learning rate: {format_setting(training.get('learning_rate'))}"
        rule = training.get("lr_scaling")
        if rule and rule != "none":
            lr_line += (
                f" ({rule} scaling of the base rate {format_setting(training.get('base_learning_rate'))} from the "
                f"reference batch {training.get('reference_batch_size')})"
            )
        text += lr_line + "\n"
    settings = info.get("smoothout")
    if settings:
        text += "\n### SmoothOut hyperparameters\n\n"
        text += f"{describe_smoothout(settings)}; the full `SmoothOutConfig`:\n\n"
        text += markdown_table(["setting", "value"], [(f"`{k}`", format_setting(v)) for k, v in settings.items()])
    others = {
        k: v
        for k, v in training.items()
        if k
        not in {
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "world_size",
            "effective_batch_size",
            "learning_rate",
            "lr_scaling",
            "base_learning_rate",
            "reference_batch_size",
        }
        and v is not None
        and not (k == "num_train_epochs" and (training.get("max_steps") or 0) > 0)  # max_steps wins
    }
    if others:
        names = {"global_step": "optimizer steps done", "max_steps": "max_steps (overrides epochs)"}
        text += "\n### Other hyperparameters\n\n"
        text += "".join(f"- {names.get(k, k)}: {format_setting(v)}\n" for k, v in others.items())
    return text


def _reproduce_section(info: Mapping[str, Any]) -> str:
    command = info.get("command")
    if not command:
        return ""
    if isinstance(command, (list, tuple)):
        import shlex

        command = " ".join(shlex.quote(str(part)) for part in command)
    return f"\n## How to reproduce\n\n```bash\n{command}\n```\n"


def _versions_section() -> str:
    from importlib.metadata import PackageNotFoundError, version

    import torch
    import transformers

    from . import __version__

    try:
        datasets_line = f"- Datasets {version('datasets')}\n"
    except PackageNotFoundError:  # not installed: the run used none
        datasets_line = ""
    return (
        "\n### Framework versions\n\n"
        f"- hf-smoothout {__version__}\n- Transformers {transformers.__version__}\n"
        f"- PyTorch {torch.__version__}\n{datasets_line}"
    )


# ---------------------------------------------------------------------------- public entry points
def build_model_card(
    output_dir: str | os.PathLike[str],
    compare_to: str | os.PathLike[str] | None = None,
    info: Mapping[str, Any] | None = None,
) -> str:
    """The model card text for the run in ``output_dir`` (optionally against the baseline run ``compare_to``).

    ``info`` replaces ``smoothout_run.json``; ``compare_to`` defaults to the one recorded there.
    """
    output_dir = Path(output_dir)
    stored, results = read_run(output_dir)
    info = dict(info) if info is not None else stored
    if compare_to is None and info.get("compare_to"):
        compare_to = info["compare_to"]
    baseline_dir = Path(compare_to) if compare_to else None
    card = f"---\n{_metadata(info, results)}\n---\n"
    card += _intro(info)
    card += _results_section(info, results)
    card += _study_section(output_dir)
    if baseline_dir is not None:
        baseline_info, _ = read_run(baseline_dir)
        card += _comparison_section(info, results, baseline_dir, baseline_info)
    card += analysis_section(output_dir, baseline_dir)
    card += _data_section(info)
    card += _procedure_section(info)
    card += _reproduce_section(info)
    card += _versions_section()
    return card


def write_model_card(
    output_dir: str | os.PathLike[str],
    compare_to: str | os.PathLike[str] | None = None,
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``output_dir/README.md`` atomically (see `build_model_card`) and return its path.

    Example:
        >>> write_model_card("outputs/glue/smoothout", compare_to="outputs/glue/baseline")  # doctest: +SKIP
    """
    card = build_model_card(output_dir, compare_to=compare_to, info=info)
    return atomic_write_text(Path(output_dir) / CARD_FILE, card)


def write_model_card_from_trainer(trainer: Any, **kwargs: Any) -> Path | None:
    """`Trainer.create_model_card` for SmoothOut runs: keeps the recipe's ``smoothout_run.json`` when there is one.

    Keyword arguments as in `transformers.Trainer.create_model_card`: ``model_name``, ``finetuned_from``
    (the base model), ``dataset``, ``dataset_tags``, ``tasks``, ``tags``, ``language``, ``license``;
    ``compare_to`` adds a baseline comparison.
    """
    if not trainer.is_world_process_zero():
        return None
    output_dir = Path(trainer.args.output_dir)
    stored = read_json(output_dir / RUN_INFO_FILE)
    info = dict(stored) if stored is not None else run_info_from_trainer(trainer)
    if kwargs.get("model_name"):
        info["model_name"] = kwargs["model_name"]
    if kwargs.get("finetuned_from"):
        info["base_model"] = kwargs["finetuned_from"]
    for key in ("language", "license"):
        if kwargs.get(key):
            info[key] = kwargs[key]
    if kwargs.get("tags"):
        extra = [kwargs["tags"]] if isinstance(kwargs["tags"], str) else list(kwargs["tags"])
        info["tags"] = list(dict.fromkeys([*(info.get("tags") or []), *extra]))
    tasks = kwargs.get("tasks")
    if tasks:
        info["task"] = {**(info.get("task") or {}), "type": tasks if isinstance(tasks, str) else tasks[0]}
    dataset = dict(info.get("dataset") or {})
    if kwargs.get("dataset"):
        dataset["name"] = kwargs["dataset"] if isinstance(kwargs["dataset"], str) else ", ".join(kwargs["dataset"])
    if kwargs.get("dataset_tags"):
        tags = kwargs["dataset_tags"]
        dataset["hub_id"] = tags if isinstance(tags, str) else tags[0]
    info["dataset"] = dataset
    if stored is None or info != stored:
        write_run_info(output_dir, {k: v for k, v in info.items() if k not in {"format", "version"}})
    if not (output_dir / RESULTS_FILE).is_file():
        evals = [log for log in trainer.state.log_history if any(k.startswith("eval_") for k in log)]
        if evals:
            atomic_write_text(output_dir / RESULTS_FILE, json.dumps(evals[-1], indent=4, sort_keys=True))
    return write_model_card(output_dir, compare_to=kwargs.get("compare_to"), info=info)


def main(argv: list[str] | None = None) -> int:
    """``python -m hf_smoothout.modelcard OUTPUT_DIR [--compare_to DIR] [--print_table]``."""
    parser = argparse.ArgumentParser(
        prog="python -m hf_smoothout.modelcard",
        description="(Re)write the model card README.md of a SmoothOut run, e.g. after running the analysis tools.",
    )
    parser.add_argument("output_dir", help="the run's output_dir (holds smoothout_run.json and all_results.json)")
    parser.add_argument("--compare_to", help="output_dir of a baseline run to compare with")
    parser.add_argument("--print_table", action="store_true", help="also print the comparison table")
    parser.add_argument("--no_card", action="store_true", help="do not write README.md (with --print_table)")
    options = parser.parse_args(argv)
    try:
        if not options.no_card:
            path = write_model_card(options.output_dir, compare_to=options.compare_to)
            print(f"model card: {path}")
        if options.print_table:
            baseline = options.compare_to or (read_run(options.output_dir)[0].get("compare_to"))
            if not baseline:
                parser.error("--print_table needs --compare_to (or a run that recorded compare_to)")
            print(comparison_table(options.output_dir, baseline), end="")
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
