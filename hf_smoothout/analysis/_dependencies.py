"""Fail early, with the install command, when the analysis tools' dependencies are missing."""

from __future__ import annotations

import importlib.util

MISSING = [name for name in ("scipy", "matplotlib") if importlib.util.find_spec(name) is None]
if MISSING:
    raise ImportError(
        f"hf_smoothout.analysis (and the hf-smoothout command) needs {' and '.join(MISSING)}: "
        "pip install 'hf-smoothout[analysis]'"
    )
