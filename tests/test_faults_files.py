"""Faults at the edges: every command line prints its help, and written files keep the user's umask."""

from __future__ import annotations

import os
import runpy
import sys
import threading
from pathlib import Path

import pytest

from hf_smoothout.modelcard import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
MAIN_THREAD = threading.main_thread().ident


# ---------------------------------------------------------------------------------------------- 10. CLIs and files
ENTRY_POINTS = [
    ["recipes/glue.py"],
    ["recipes/image_classification.py"],
    *[[str(p.relative_to(ROOT))] for p in sorted((ROOT / "study").glob("*.py")) if "__main__" in p.read_text()],
    ["benchmarks/overhead.py"],
    ["benchmarks/perturb.py"],
    ["-m", "hf_smoothout.cli"],
    ["-m", "hf_smoothout.cli", "sharpness"],
    ["-m", "hf_smoothout.cli", "landscape"],
    ["-m", "hf_smoothout.modelcard"],
]


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda e: " ".join(e))
def test_every_command_line_prints_its_help(entry, capsys, monkeypatch):
    if entry[0] == "-m":
        target, rest = entry[1], entry[2:]
        monkeypatch.setattr(sys, "argv", [target, *rest, "--help"])
        run = lambda: runpy.run_module(target, run_name="__main__", alter_sys=False)  # noqa: E731
    else:
        path = ROOT / entry[0]
        monkeypatch.setattr(sys, "argv", [str(path), "--help"])
        monkeypatch.syspath_prepend(str(path.parent))
        run = lambda: runpy.run_path(str(path), run_name="__main__")  # noqa: E731
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_keep_the_users_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        path = atomic_write_text(tmp_path / "README.md", "card")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o666 & ~umask
    assert not list(tmp_path.glob(".*.tmp"))
