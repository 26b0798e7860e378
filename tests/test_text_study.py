"""The text large-batch study on a tiny slice of the offline Rotten Tomatoes data (one MiniLM layer)."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))


def load_study():
    spec = importlib.util.spec_from_file_location("text_large_batch", ROOT / "study" / "text_large_batch.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def offline_text_available() -> bool:
    try:
        from recipe_kit.offline import minilm_dir, rotten_tomatoes_file

        minilm_dir(), rotten_tomatoes_file()
        return True
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not offline_text_available(), reason="offline MiniLM / Rotten Tomatoes not installed")
def test_text_study_runs_every_method_and_reports(tmp_path):
    study = load_study()
    argv = [
        "--output_dir",
        str(tmp_path),
        "--seeds",
        "0",
        "--per_device_batch",
        "8",
        "--accumulation",
        "2",
        "--num_hidden_layers",
        "1",
        "--max_seq_length",
        "32",
        "--max_train_samples",
        "48",
        "--max_eval_samples",
        "40",
    ]
    study.main(argv)
    rows = {}
    for method in ("baseline", "smoothout", "adasmoothout"):
        run = json.loads((tmp_path / f"{method}-s0" / "smoothout_run.json").read_text())
        results = json.loads((tmp_path / f"{method}-s0" / "all_results.json").read_text())
        rows[method] = results["eval_accuracy"]
        training = run["training"]
        assert training["effective_batch_size"] == 16 and training["lr_scaling"] == "sqrt"
        assert training["learning_rate"] == pytest.approx(1e-4 * 2**0.5)  # sqrt rule from the 8-example micro-batch
        assert training["seed"] == 0
    text = (tmp_path / "report.md").read_text()
    for method, accuracy in rows.items():
        assert f"| {method} |" in text and f"{100 * statistics.mean([accuracy]):.2f} ± 0.00" in text
    # resuming skips finished runs
    before = (tmp_path / "baseline-s0" / "all_results.json").stat().st_mtime
    study.main(argv)
    assert (tmp_path / "baseline-s0" / "all_results.json").stat().st_mtime == before
