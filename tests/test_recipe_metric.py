"""The local GLUE metric module (recipes/metrics/glue_metric) equals scikit-learn and scipy on random inputs."""

from __future__ import annotations

from pathlib import Path

import evaluate
import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

METRIC_DIR = str(Path(__file__).resolve().parents[1] / "recipes" / "metrics" / "glue_metric")
CLASSIFICATION = ["cola", "sst2", "mrpc", "qqp", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli"]


def reference(task: str, predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    if task == "cola":
        return {"matthews_correlation": matthews_corrcoef(references, predictions)}
    if task == "stsb":
        return {
            "pearson": pearsonr(predictions, references)[0],
            "spearmanr": spearmanr(predictions, references)[0],
        }
    result = {"accuracy": accuracy_score(references, predictions)}
    if task in {"mrpc", "qqp"}:
        result["f1"] = f1_score(references, predictions)
    return result


@pytest.mark.parametrize("task", [*CLASSIFICATION, "stsb"])
@pytest.mark.parametrize("seed", range(4))
def test_matches_sklearn_and_scipy(task, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    if task == "stsb":
        references = np.round(rng.uniform(0, 5, n), 1)  # rounded: ties, as in STS-B
        predictions = np.round(references + rng.normal(0, 1.5, n), 1 if seed % 2 else 3)
    else:
        classes = 3 if task.startswith("mnli") else 2
        references = rng.integers(0, classes, n)
        predictions = np.where(rng.random(n) < 0.6, references, rng.integers(0, classes, n))
    metric = evaluate.load(METRIC_DIR, config_name=task)
    ours = metric.compute(predictions=predictions, references=references)
    expected = reference(task, predictions, references)
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(float(value), abs=1e-6), key


def test_degenerate_inputs_follow_sklearn():
    cola = evaluate.load(METRIC_DIR, config_name="cola")
    constant = np.zeros(10, dtype=int)
    labels = np.array([0, 1] * 5)
    assert cola.compute(predictions=constant, references=labels)["matthews_correlation"] == matthews_corrcoef(
        labels, constant
    )
    mrpc = evaluate.load(METRIC_DIR, config_name="mrpc")
    assert mrpc.compute(predictions=constant, references=constant)["f1"] == 0.0  # no positives at all


def test_multiclass_matthews_and_ranks_match_sklearn_and_scipy():
    import importlib.util

    from scipy.stats import rankdata

    spec = importlib.util.spec_from_file_location("glue_metric_module", Path(METRIC_DIR) / "glue_metric.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = np.random.default_rng(7)
    for _ in range(20):
        references, predictions = rng.integers(0, 4, 50), rng.integers(0, 4, 50)
        expected = matthews_corrcoef(references, predictions)
        assert module.matthews_correlation(predictions, references) == pytest.approx(expected, abs=1e-12)
        values = rng.integers(0, 6, 40).astype(float)
        assert np.allclose(module.average_ranks(values), rankdata(values))


def test_unknown_config_is_refused():
    with pytest.raises(KeyError, match="Unknown GLUE task 'sts'"):
        evaluate.load(METRIC_DIR, config_name="sts")
