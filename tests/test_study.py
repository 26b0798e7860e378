"""The Fashion-MNIST large-batch study end to end on tiny settings (real data, a few hundred examples)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def load_study():
    return load_script(ROOT / "study" / "fmnist_large_batch.py")


def fashion_mnist_available() -> bool:
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        from recipe_kit.offline import fashion_mnist_dir

        fashion_mnist_dir()
        return True
    except Exception:
        return False


TINY = [
    "--hidden",
    "16",
    "--depth",
    "2",
    "--max_train_samples",
    "400",
    "--max_test_samples",
    "100",
    "--epochs",
    "1",
    "--small_batch",
    "32",
    "--large_batch",
    "128",
    "--seeds",
    "0",
    "1",
    "--strengths_none",
    "0.01",
    "0.02",
    "--strengths_filter",
    "0.05",
    "--sharpness_samples",
    "100",
    "--sharpness_iterations",
    "2",
    "--sharpness_repeats",
    "1",
    "--hessian_iterations",
    "3",
]


@pytest.mark.slow
@pytest.mark.skipif(
    not fashion_mnist_available(), reason="Fashion-MNIST not installed (scripts/install_offline_data.sh)"
)
def test_study_runs_reports_and_resumes(tmp_path):
    study = load_study()
    out = tmp_path / "study"
    study.main(["--output_dir", str(out), *TINY])
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    sweep = [r for r in runs if r["phase"] == "sweep"]
    final = [r for r in runs if r["phase"] == "final"]
    assert len(sweep) == 2 * (2 + 1)  # two batch sizes x (two SmoothOut strengths + one AdaSmoothOut)
    assert len(final) == 2 * 2 * 3  # seeds x batch sizes x methods
    assert all("validation_accuracy" in r and "test_accuracy" not in r for r in sweep)  # the sweep never sees test
    for r in final:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["gap"] == pytest.approx(r["train_accuracy"] - r["test_accuracy"])
        assert r["epsilon_sharpness"] >= 0.0 and r["hessian_top"] == r["hessian_top"]
    # large batch: the LR follows the sqrt rule; same number of epochs means 4x fewer steps
    small = next(r for r in final if r["batch"] == 32)
    large = next(r for r in final if r["batch"] == 128)
    assert small["lr"] == pytest.approx(0.05)  # the optimizer really runs at the configured LR
    assert large["lr"] == pytest.approx(small["lr"] * 2.0)
    # the chosen strength is the sweep's best on validation
    best = max(
        (r for r in sweep if r["batch"] == 32 and r["method"] == "smoothout"),
        key=lambda r: (r["validation_accuracy"], r["strength"]),
    )
    assert {r["strength"] for r in final if r["batch"] == 32 and r["method"] == "smoothout"} == {best["strength"]}

    text = (out / "report.md").read_text()
    baseline_small = [r["test_accuracy"] for r in final if r["batch"] == 32 and r["method"] == "baseline"]
    assert f"{100 * statistics.mean(baseline_small):.2f} ± {100 * statistics.stdev(baseline_small):.2f}" in text
    assert "Large-batch gap" in text
    png = out / "plots" / "small_vs_large_baseline" / "landscape_interpolation.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the best seed of every cell is exported with a model card carrying the study table, its own row in bold
    for batch, method in ((32, "baseline"), (128, "adasmoothout")):
        folder = out / "best" / f"b{batch}-{method}"
        cell = [r for r in final if r["batch"] == batch and r["method"] == method]
        best_run = max(cell, key=lambda r: r["test_accuracy"])
        assert json.loads((folder / "all_results.json").read_text())["test_accuracy"] == best_run["test_accuracy"]
        card = (folder / "README.md").read_text()
        assert "## Fashion-MNIST large-batch study" in card and f"seed {best_run['seed']}" in card
        assert f"| **{batch}** | **{method}** |" in card and "library_name: pytorch" in card
        model = study.load_model(study.StudyArguments(output_dir=str(out), hidden=16, depth=2), best_run["key"])
        exported = study.KeskarMLP(16, 2)
        from safetensors.torch import load_file

        exported.load_state_dict(load_file(str(folder / "model.safetensors")))
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, exported.state_dict()[name])

    # resuming re-trains nothing
    study.main(["--output_dir", str(out), "--stage", "final", *TINY])
    assert len((out / "runs.jsonl").read_text().splitlines()) == len(runs)
