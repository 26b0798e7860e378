"""Running ``recipes/*.py`` as study runs: one subprocess per run, its log in a file, its results read back.

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
