"""Running ``recipes/*.py`` as study runs: one subprocess per run, its log in a file, its results read back.

* :func:`optional_flags` -- command-line flags for the settings that are set.
* :func:`execute` -- one command, its output in a log file; an error that names the log when it fails.
* :func:`recipe_results` -- the ``all_results.json`` of a finished run.
* :func:`run_recipe` -- a recipe run into its folder (log beside it), then one line with its key result.

Example:
    >>> optional_flags([("--max_train_samples", 64), ("--model_name_or_path", None)])
    ['--max_train_samples', '64']
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any


def optional_flags(pairs: list[tuple[str, Any]]) -> list[str]:
    """``[flag, value, ...]`` for the pairs whose value is not ``None``."""
    return [item for flag, value in pairs if value is not None for item in (flag, str(value))]


def recipe_results(folder: Path) -> dict[str, Any] | None:
    """The ``all_results.json`` a finished recipe run wrote into ``folder``, else ``None``."""
    path = folder / "all_results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def execute(command: list[str], log: Path, what: str) -> None:
    """Run ``command`` with its output in ``log``; raise with the log's path when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}); see {log}")


def run_recipe(command: list[str], folder: Path, what: str, measure: str) -> dict[str, Any]:
    """Run ``command`` (a recipe writing into ``folder``; its log is ``<folder>.log``), then print
    ``<what>: <measure> <value>`` from its results and return them.

    Example:
        >>> import sys, tempfile
        >>> folder = Path(tempfile.mkdtemp()) / "run"
        >>> write = f"import json, os; os.makedirs({str(folder)!r}); json.dump({{'eval_accuracy': 0.5}}, "
        >>> write += f"open({str(folder / 'all_results.json')!r}, 'w'))"
        >>> run_recipe([sys.executable, "-c", write], folder, "final run-s0", "eval_accuracy")
        final run-s0: eval_accuracy 0.5000
        {'eval_accuracy': 0.5}
    """
    execute(command, folder.parent / f"{folder.name}.log", what)
    results = recipe_results(folder)
    if results is None:
        raise RuntimeError(f"{what} wrote no {folder / 'all_results.json'}; see {folder.parent / f'{folder.name}.log'}")
    print(f"{what}: {measure} {results[measure]:.4f}", flush=True)
    return results
