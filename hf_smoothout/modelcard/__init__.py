"""Hub model cards for SmoothOut runs: results, SmoothOut hyperparameters, baseline comparison, sharpness.

Every run directory holds ``smoothout_run.json`` (what was trained: base model, dataset, effective batch, learning
rate, SmoothOut settings; `RunInfo`, written by `write_run_info`) and the Trainer's ``all_results.json``.
`write_model_card` renders them into ``README.md`` with `huggingface_hub.ModelCard.from_template` and
``templates/model_card.md``: YAML metadata (tags, ``base_model``, datasets, ``model-index``) and text. With a
baseline run directory (``compare_to``) the card shows both runs side by side with the difference. If
``<run>/analysis/`` holds ``sharpness.json`` or ``landscape_*.png`` (from the analysis tools), the card reports them
too, so re-run it after the analysis. A study that trained the run among others puts its results table in
``smoothout_study.json`` (`write_study_rows`), and the card shows that table with the run's own row marked:

    python -m hf_smoothout.modelcard OUTPUT_DIR [--compare_to BASELINE_DIR] [--print_table]

Modules: `runinfo` (the record and its files), `tables` (numbers and tables), `card` (metadata, template context,
rendering), `cli` (the command line).

Example:
    >>> import json, tempfile, pathlib
    >>> run = pathlib.Path(tempfile.mkdtemp())
    >>> _ = write_run_info(run, {"model_name": "demo", "smoothout": {"strength": 0.01, "adapt": "filter"}})
    >>> _ = (run / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.9}))
    >>> "smoothout" in write_model_card(run).read_text()
    True
"""

from __future__ import annotations

from .card import TEMPLATE, build_model_card, card_data, write_model_card, write_model_card_from_trainer
from .cli import main
from .runinfo import (
    ANALYSIS_DIR,
    CARD_FILE,
    RESULTS_FILE,
    RUN_INFO_FILE,
    SHARPNESS_FILE,
    STUDY_FILE,
    RunInfo,
    atomic_write_text,
    read_json,
    read_run,
    run_info_from_trainer,
    training_info_from_args,
    write_run_info,
)
from .tables import (
    comparison_rows,
    comparison_table,
    describe_smoothout,
    flatten_numbers,
    format_difference,
    format_setting,
    format_value,
    markdown_table,
    metric_label,
    result_metrics,
    settings_differences,
    write_study_rows,
)

__all__ = [
    "ANALYSIS_DIR",
    "CARD_FILE",
    "RESULTS_FILE",
    "RUN_INFO_FILE",
    "SHARPNESS_FILE",
    "STUDY_FILE",
    "TEMPLATE",
    "RunInfo",
    "atomic_write_text",
    "build_model_card",
    "card_data",
    "comparison_rows",
    "comparison_table",
    "describe_smoothout",
    "flatten_numbers",
    "format_difference",
    "format_setting",
    "format_value",
    "main",
    "markdown_table",
    "metric_label",
    "read_json",
    "read_run",
    "result_metrics",
    "run_info_from_trainer",
    "settings_differences",
    "training_info_from_args",
    "write_model_card",
    "write_model_card_from_trainer",
    "write_run_info",
    "write_study_rows",
]
