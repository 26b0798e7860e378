"""Numbers and tables of model cards: formatting, result metrics, run-vs-baseline comparison, sharpness, studies.

Example:
    >>> print(markdown_table(["metric", "value"], [("accuracy", format_value(0.875))]), end="")
    | metric | value |
    |---|---|
    | accuracy | 0.8750 |
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .runinfo import ANALYSIS_DIR, SHARPNESS_FILE, STUDY_FILE, atomic_write_text, read_json, read_run

# Keys of all_results.json that are bookkeeping, not results.
_BOOKKEEPING_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second", "_samples", "total_flos", "epoch")
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


def arm_label(info: Mapping[str, Any], fallback: str) -> str:
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
    header = ["metric", arm_label(base_info, "baseline"), arm_label(info, "this run"), "difference"]
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


def analysis_context(run_dir: Path, baseline_dir: Path | None) -> dict[str, Any] | None:
    """The sharpness table and landscape plots of ``<run>/analysis/`` for the card, or ``None`` when there are none.

    ``sharpness.json`` as the analysis tools write it (``{"measures": {name: {"value", "std", ...}}, ...}``)
    becomes a table of measures (and a line of the settings beside them); any other JSON object is shown flattened.
    """
    analysis = run_dir / ANALYSIS_DIR
    sharpness = read_json(analysis / SHARPNESS_FILE)
    plots = sorted(analysis.glob("landscape_*.png")) if analysis.is_dir() else []
    if sharpness is None and not plots:
        return None
    table = settings = None
    if sharpness is not None:
        base_json = read_json(baseline_dir / ANALYSIS_DIR / SHARPNESS_FILE) if baseline_dir is not None else None
        measures = sharpness.get("measures")
        if isinstance(measures, Mapping):
            base_measures = base_json.get("measures") if base_json is not None else None
            header, rows = _measure_rows(measures, base_measures if isinstance(base_measures, Mapping) else None)
            table = markdown_table(header, rows)
            context = {k: v for k, v in sharpness.items() if k != "measures"}
            if context:
                settings = "; ".join(f"{k}: {format_setting(v)}" for k, v in context.items())
        else:
            mine = flatten_numbers(sharpness)
            base = flatten_numbers(base_json) if base_json is not None else None
            if base:
                rows = [
                    (key, format_value(base.get(key, "")), format_value(value), format_difference(value, base.get(key)))
                    for key, value in mine.items()
                ]
                table = markdown_table(["quantity", "baseline", "this run", "difference"], rows)
            else:
                table = markdown_table(["quantity", "value"], [(k, format_value(v)) for k, v in mine.items()])
    return {
        "source": f"{ANALYSIS_DIR}/{SHARPNESS_FILE}",
        "table": table,
        "settings": settings,
        "plots": [
            {
                "title": p.stem.removeprefix("landscape_").replace("_", " "),
                "name": p.stem,
                "path": f"{ANALYSIS_DIR}/{p.name}",
            }
            for p in plots
        ],
    }


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
        >>> "**smoothout**" in study_context(Path(run))["table"]
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


def study_context(run_dir: Path) -> dict[str, Any] | None:
    """The study table of ``smoothout_study.json`` with this run's row in bold, or ``None`` when there is none."""
    study = read_json(run_dir / STUDY_FILE)
    if study is None:
        return None
    highlight = study.get("highlight")
    rows = [[f"**{cell}**" if i == highlight and cell else cell for cell in row] for i, row in enumerate(study["rows"])]
    return {
        "title": study["title"],
        "description": study["description"],
        "highlighted": highlight is not None,
        "table": markdown_table(study["header"], rows),
    }
