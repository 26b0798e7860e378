"""The text large-batch study on a tiny slice of the offline Rotten Tomatoes data (one MiniLM layer)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))


def load_study():
    return load_script(ROOT / "study" / "text_large_batch.py")


def offline_text_available() -> bool:
    try:
        from recipe_kit.offline import minilm_dir, rotten_tomatoes_file

        minilm_dir(), rotten_tomatoes_file()
        return True
    except Exception:
        return False


TINY = [
    "--seeds",
    "0",
    "--strengths_none",
    "0.01",
    "--strengths_filter",
    "0.1",
    "--per_device_batch",
    "8",
    "--accumulation",
    "2",
    "--learning_rate",
    "1e-4",
    "--num_hidden_layers",
    "1",
    "--max_seq_length",
    "32",
    "--max_train_samples",
    "60",
    "--max_eval_samples",
    "40",
    "--train_eval_samples",
    "30",
    "--sharpness_batch_size",
    "8",
    "--sharpness_batches",
    "1",
    "--sharpness_iterations",
    "2",
    "--sharpness_repeats",
    "1",
    "--interpolation_points",
    "3",
]


def test_study_arguments_are_checked_before_any_run(tmp_path):
    study = load_study()
    with pytest.raises(ValueError, match="sweep_seed"):
        study.main(["--output_dir", str(tmp_path), "--seeds", "0", "100"])
    with pytest.raises(ValueError, match="holdout_fraction"):
        study.main(["--output_dir", str(tmp_path), "--holdout_fraction", "0"])
    assert not any(tmp_path.iterdir())


def test_final_runs_need_the_sweep(tmp_path):
    study = load_study()
    with pytest.raises(RuntimeError, match="--stage sweep"):
        study.main(["--output_dir", str(tmp_path), "--stage", "final"])


@pytest.mark.slow
@pytest.mark.studies
@pytest.mark.skipif(not offline_text_available(), reason="offline MiniLM / Rotten Tomatoes not installed")
def test_text_study_sweeps_on_holdout_trains_measures_and_reports(tmp_path):
    study = load_study()
    argv = ["--output_dir", str(tmp_path), *TINY]
    study.main(argv)

    # sweep: every strength scored on the holdout carved from the training data, not on the test split
    for name, strength in (("baseline-a0", 0.0), ("smoothout-a0.01", 0.01), ("adasmoothout-a0.1", 0.1)):
        res = json.loads((tmp_path / "sweep" / name / "all_results.json").read_text())
        run = json.loads((tmp_path / "sweep" / name / "smoothout_run.json").read_text())
        assert res["holdout_samples"] == 6 and res["train_samples"] == 54  # 10 % of the 60 training examples
        assert run["smoothout"]["strength"] == strength and run["training"]["seed"] == 100

    # final: small-batch baseline + three large-batch arms, on all training examples, measured
    for name, batch in (
        ("baseline-b8-s0", 8),
        *((f"{m}-b16-s0", 16) for m in ("baseline", "smoothout", "adasmoothout")),
    ):
        folder = tmp_path / "final" / name
        res = json.loads((folder / "all_results.json").read_text())
        run = json.loads((folder / "smoothout_run.json").read_text())
        assert res["train_samples"] == 60 and res["trainset_samples"] == 30 and "holdout_accuracy" not in res
        assert run["training"]["effective_batch_size"] == batch
        assert run["training"]["learning_rate"] == pytest.approx(1e-4 * (batch / 8) ** 0.5)
        measures = json.loads((folder / "analysis" / "sharpness.json").read_text())["measures"]
        assert set(measures) == {"epsilon_subspace", "hessian_top"}
    for pair in ("small_vs_large_baseline", "large_baseline_vs_smoothout", "large_baseline_vs_adasmoothout"):
        assert (tmp_path / "landscapes" / pair / "landscape_interpolation.png").is_file()

    text = (tmp_path / "report.md").read_text()
    assert "0.01 (chosen)" in text and "0.1 (chosen)" in text
    assert "| 8 | baseline | 0 |" in text and "| 16 | adasmoothout | 0.1 |" in text
    assert "Large-batch gap" in text and "| smoothout |" in text
    # the best run of each cell (one seed here) carries the study table in its model card, its row in bold
    card = (tmp_path / "final" / "adasmoothout-b16-s0" / "README.md").read_text()
    assert "## MiniLM large-batch study" in card and "| **16** | **adasmoothout** |" in card
    assert "## Sharpness and loss landscape" in card

    # resuming skips finished runs and measures
    before = (tmp_path / "final" / "baseline-b16-s0" / "all_results.json").stat().st_mtime
    sharp = (tmp_path / "final" / "baseline-b16-s0" / "analysis" / "sharpness.json").stat().st_mtime
    study.main(argv)
    assert (tmp_path / "final" / "baseline-b16-s0" / "all_results.json").stat().st_mtime == before
    assert (tmp_path / "final" / "baseline-b16-s0" / "analysis" / "sharpness.json").stat().st_mtime == sharp
