"""The ``runs.jsonl`` ledger that makes a study resumable: one JSON record per finished run, found by its key.

* :func:`read_runs`, :func:`append_run` -- read the ledger (a line cut off by a kill is ignored) and append to it
  durably (the cut-off line is removed first; an exclusive lock lets stage processes share the file).
* :func:`run_key` -- ``<phase>-b<batch>-<arm>-<tag><value>-s<seed>``, the name of a run in the ledger.
* :func:`run_settings`, :func:`check_reusable` -- the settings a run was made with, and the refusal to reuse a
  run whose settings differ from the current ones.
* :func:`run_once` -- the record of a run: from the ledger when it is there, else trained and appended.
* :func:`checkout_commit` -- the git commit of the code that made a run.

Example:
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "runs.jsonl"
    >>> runs = read_runs(path)
    >>> key = run_key("final", 4096, "ghost", 0.0, seed=3)
    >>> key
    'final-b4096-ghost-v0-s3'
    >>> record, trained = run_once(path, runs, key, lambda: {"key": key, "test_accuracy": 0.88})
    >>> trained, run_once(path, read_runs(path), key, lambda: {})[1]
    (True, False)
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

Record = dict[str, Any]


def read_runs(path: Path) -> dict[str, Record]:
    """Records of ``runs.jsonl`` by key; a line that does not parse (a write cut off by a kill) is ignored.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "runs.jsonl"
        >>> _ = path.write_text('{"key": "a"}\\n{"key": "b", "trunc')
        >>> list(read_runs(path))
        ['a']
    """
    if not path.is_file():
        return {}
    runs = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            print(f"Ignoring an unreadable line of {path} (cut off while writing): {line[:80]!r}", file=sys.stderr)
            continue
        if isinstance(record, dict) and "key" in record:
            runs[record["key"]] = record
    return runs


def append_run(path: Path, record: Record) -> None:
    """Append ``record`` as one JSON line, durably (flush + fsync).

    A partial last line (no trailing newline: the process was killed mid-write) is cut off first, so the
    new record never fuses with it. An exclusive lock makes appends from stage processes that run side by
    side (e.g. ``--stage core --seeds 0 1`` beside ``--stage small``) safe.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "runs.jsonl"
        >>> _ = path.write_text('{"key": "a"}\\n{"key": "b", "trunc')
        >>> append_run(path, {"key": "c"})
        >>> list(read_runs(path))
        ['a', 'c']
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # stage processes running side by side share the ledger
        try:
            f.seek(0)
            content = f.read()
            if content and not content.endswith(b"\n"):
                f.truncate(content.rfind(b"\n") + 1)
            f.write((json.dumps(record) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_key(phase: str, batch: int, arm: str, value: float, seed: int, tag: str = "v") -> str:
    """``<phase>-b<batch>-<arm>-<tag><value>-s<seed>``; ``value`` is the tuned strength or rho (0 for baselines),
    ``tag`` the letter before it (``v`` in the ghost study, ``a`` in the large-batch study).

    Example:
        >>> run_key("sweep", 128, "smoothout", 0.001, 100, tag="a")
        'sweep-b128-smoothout-a0.001-s100'
    """
    return f"{phase}-b{batch}-{arm}-{tag}{value:g}-s{seed}"


def run_settings(options: Any, names: Iterable[str]) -> dict[str, Any]:
    """The settings ``names`` of ``options`` (a study's argument dataclass), stored with a run.

    Example:
        >>> from types import SimpleNamespace
        >>> run_settings(SimpleNamespace(epochs=50.0, seed=0), ["epochs"])
        {'epochs': 50.0}
    """
    return {name: getattr(options, name) for name in names}


def check_reusable(record: Record, expected: dict[str, Any]) -> None:
    """Raise when ``record`` was made with settings other than ``expected`` (naming the ones that differ).

    Example:
        >>> check_reusable({"key": "k", "settings": {"epochs": 50.0}}, {"epochs": 40.0})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: Run k in runs.jsonl was made with other settings (epochs); use another --output_dir or ...
    """
    if record.get("settings") != expected:
        changed = sorted(k for k in expected if (record.get("settings") or {}).get(k) != expected[k])
        raise ValueError(
            f"Run {record['key']} in runs.jsonl was made with other settings ({', '.join(changed)}); use another "
            "--output_dir or the same settings."
        )


def run_once(
    path: Path,
    runs: dict[str, Record],
    key: str,
    train: Callable[[], Record],
    settings: dict[str, Any] | None = None,
) -> tuple[Record, bool]:
    """``(record, trained)``: the ledger's record of ``key`` (checked against ``settings`` when given), else
    ``train()``'s, appended to ``path`` and ``runs``.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "runs.jsonl"
        >>> run_once(path, {}, "a", lambda: {"key": "a", "settings": {"epochs": 2}}, {"epochs": 2})[1]
        True
    """
    if key in runs:
        if settings is not None:
            check_reusable(runs[key], settings)
        return runs[key], False
    record = train()
    append_run(path, record)
    runs[key] = record
    return record, True


def checkout_commit(folder: Path) -> str | None:
    """The short git commit of the checkout that holds ``folder`` (the code that made a run), or None outside git.

    Example:
        >>> checkout_commit(Path("/"))  # not a checkout
    """
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None
