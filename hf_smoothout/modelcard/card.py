"""The model card of a run: Hub metadata (`huggingface_hub.ModelCardData`) and the words of
``templates/model_card.md``, rendered with `huggingface_hub.ModelCard.from_template` from the run's
``smoothout_run.json``, ``all_results.json``, optional baseline run, ``analysis/`` and study table.

Example:
    >>> import tempfile, pathlib
    >>> run = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (run / "all_results.json").write_text('{"eval_loss": 0.3}')
    >>> card = build_model_card(run, info={"model_name": "demo", "smoothout": {"strength": 0.02, "adapt": "none"}})
    >>> card.splitlines()[card.splitlines().index("# demo") + 2].split(": ")[-1]
    'SmoothOut a=0.02 (none).'
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .runinfo import (
    CARD_FILE,
    RESULTS_FILE,
    RUN_INFO_FILE,
    RunInfo,
    atomic_write_text,
    read_json,
    read_run,
    run_info_from_trainer,
    write_run_info,
)
from .tables import (
    analysis_context,
    arm_label,
    comparison_rows,
    describe_smoothout,
    format_setting,
    format_value,
    markdown_table,
    metric_label,
    result_metrics,
    settings_differences,
    study_context,
)

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
PAPER = "[SmoothOut](https://arxiv.org/abs/1805.07898) (Wen et al., 2018)"
BASE_TAGS = ("smoothout", "generated_from_trainer")

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
_LEARNING_RATE_KEYS = {
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "world_size",
    "effective_batch_size",
    "learning_rate",
    "lr_scaling",
    "base_learning_rate",
    "reference_batch_size",
}


def card_data(info: RunInfo, results: Mapping[str, Any]) -> Any:
    """The card's YAML metadata: tags, base model, datasets, and a ``model-index`` entry per Hub-known metric."""
    from huggingface_hub import EvalResult, ModelCardData

    task, dataset = info.task, info.dataset
    tags = list(BASE_TAGS)
    for tag in [task.get("type"), *info.tags]:
        if tag and tag not in tags:
            tags.append(tag)
    if describe_smoothout(info.smoothout) == "SmoothOut off":
        tags.append("smoothout-baseline")
    eval_results, metric_types = [], []
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
    return ModelCardData(
        model_name=info.model_name or "smoothout-model",
        base_model=info.base_model or None,
        datasets=[dataset["hub_id"]] if dataset.get("hub_id") else None,
        library_name=info.library_name or "transformers",
        license=info.license,
        language=info.language,
        pipeline_tag=task.get("type"),
        tags=tags,
        metrics=sorted(set(metric_types)) or None,
        eval_results=eval_results or None,
    )


def _data_name(dataset: Mapping[str, Any]) -> str:
    name = dataset.get("name") or "a custom dataset"
    if dataset.get("hub_id"):
        config = f", config `{dataset['config']}`" if dataset.get("config") else ""
        name += f" ([`{dataset['hub_id']}`](https://huggingface.co/datasets/{dataset['hub_id']}){config})"
    return name


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else format_value(value)


def _data_lines(dataset: Mapping[str, Any]) -> list[str]:
    lines = []
    if dataset.get("name"):
        lines.append(f"dataset: {dataset['name']}")
    if dataset.get("num_train") is not None:
        split = f" (`{dataset['train_split']}`)" if dataset.get("train_split") else ""
        lines.append(f"training examples: {_count(dataset['num_train'])}{split}")
    if dataset.get("num_eval") is not None:
        splits = ", ".join(f"`{s}`" for s in dataset.get("eval_splits") or [])
        lines.append(f"evaluation examples: {_count(dataset['num_eval'])}{f' ({splits})' if splits else ''}")
    if dataset.get("notes"):
        lines.append(str(dataset["notes"]))
    return lines


def _training_context(training: Mapping[str, Any]) -> dict[str, Any]:
    if not training:
        return {"batch_line": None, "lr_line": None, "other_settings": []}
    batch_line = None
    if training.get("effective_batch_size") is not None:
        world = training.get("world_size")
        batch_line = (
            f"effective batch size: {training['effective_batch_size']} = "
            f"{training.get('per_device_train_batch_size')} per device x "
            f"{training.get('gradient_accumulation_steps')} gradient accumulation x "
            f"{world} process{'es' if world != 1 else ''}"
        )
    lr_line = f"learning rate: {format_setting(training.get('learning_rate'))}"
    rule = training.get("lr_scaling")
    if rule and rule != "none":
        lr_line += (
            f" ({rule} scaling of the base rate {format_setting(training.get('base_learning_rate'))} from the "
            f"reference batch {training.get('reference_batch_size')})"
        )
    names = {"global_step": "optimizer steps done", "max_steps": "max_steps (overrides epochs)"}
    others = [
        f"{names.get(k, k)}: {format_setting(v)}"
        for k, v in training.items()
        if k not in _LEARNING_RATE_KEYS
        and v is not None
        and not (k == "num_train_epochs" and (training.get("max_steps") or 0) > 0)  # max_steps wins
    ]
    return {"batch_line": batch_line, "lr_line": lr_line, "other_settings": others}


def _results_table(metrics: Mapping[str, Any], primary: str | None) -> str | None:
    rows = [
        (f"**{metric_label(k)}**" if k == primary else metric_label(k), format_value(v)) for k, v in metrics.items()
    ]
    return markdown_table(["metric", "value"], rows) if rows else None


def _comparison_context(results: Mapping[str, Any], info: RunInfo, baseline_dir: Path) -> dict[str, Any]:
    baseline_info, base_results = read_run(baseline_dir)
    rows = comparison_rows(results, base_results)
    header = ["metric", arm_label(baseline_info, "baseline"), arm_label(info.to_dict(), "this run"), "difference"]
    return {
        "dir": str(baseline_dir),
        "baseline": describe_smoothout(baseline_info.get("smoothout")),
        "table": markdown_table(header, rows) if rows else None,
        "differences": settings_differences(info.to_dict(), baseline_info),
        "shared": bool(baseline_info),
    }


def _versions() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    import torch
    import transformers

    from .. import __version__

    lines = [f"hf-smoothout {__version__}", f"Transformers {transformers.__version__}", f"PyTorch {torch.__version__}"]
    with contextlib.suppress(PackageNotFoundError):  # not installed: the run used none
        lines.append(f"Datasets {version('datasets')}")
    return lines


def build_model_card(
    output_dir: str | os.PathLike[str],
    compare_to: str | os.PathLike[str] | None = None,
    info: Mapping[str, Any] | None = None,
) -> str:
    """The model card text for the run in ``output_dir`` (optionally against the baseline run ``compare_to``).

    ``info`` replaces ``smoothout_run.json``; ``compare_to`` defaults to the one recorded there.
    """
    from huggingface_hub import ModelCard

    output_dir = Path(output_dir)
    stored, results = read_run(output_dir)
    run = RunInfo.from_dict(info if info is not None else stored)
    compare_to = compare_to if compare_to is not None else run.compare_to
    baseline_dir = Path(compare_to) if compare_to else None
    method = describe_smoothout(run.smoothout)
    metrics = result_metrics(results)
    splits = run.dataset.get("eval_splits")
    command = run.command
    if isinstance(command, (list, tuple)):
        command = " ".join(shlex.quote(str(part)) for part in command)
    context = {
        "name": run.model_name or "SmoothOut model",
        "base_model": run.base_model,
        "init_from": run.init_from,
        "architecture": run.model_type or "a model",
        "notes": f" ({run.model_notes})" if run.model_notes else "",
        "data_name": _data_name(run.dataset),
        "smoothout_on": method != "SmoothOut off",
        "paper": PAPER,
        "method": method,
        "results_table": markdown_table(
            ["metric", "value"],
            [
                (f"**{metric_label(k)}**" if k == run.primary_metric else metric_label(k), format_value(v))
                for k, v in metrics.items()
            ],
        )
        if metrics
        else None,
        "where": f" on {', '.join(f'`{s}`' for s in splits)}" if splits else "",
        "study": study_context(output_dir),
        "comparison": _comparison_context(results, run, baseline_dir) if baseline_dir else None,
        "analysis": analysis_context(output_dir, baseline_dir),
        "data_lines": _data_lines(run.dataset),
        **_training_context(run.training),
        "smoothout_settings": markdown_table(
            ["setting", "value"], [(f"`{k}`", format_setting(v)) for k, v in run.smoothout.items()]
        )
        if run.smoothout
        else None,
        "command": command,
        "versions": _versions(),
    }
    card = ModelCard.from_template(card_data(run, results), template_path=str(TEMPLATE), **context)
    return str(card)


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
