"""GLUE metrics as a local `evaluate` module (no Hub needed).

The official metric of every GLUE task: accuracy (SST-2, MNLI, QNLI, RTE, WNLI), accuracy and F1
(MRPC, QQP), Matthews correlation (CoLA), Pearson and Spearman correlation (STS-B). Computed with
numpy only; ``tests/test_recipe_metric.py`` checks it against scikit-learn and scipy.

Example:
    >>> import evaluate
    >>> metric = evaluate.load("recipes/metrics/glue_metric", config_name="mrpc")  # doctest: +SKIP
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])  # doctest: +SKIP
    {'accuracy': 0.6666666666666666, 'f1': 0.6666666666666666}
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

ACCURACY_TASKS = ("sst2", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli", "hans")
F1_TASKS = ("mrpc", "qqp")
TASKS = (*ACCURACY_TASKS, *F1_TASKS, "cola", "stsb")

_DESCRIPTION = """The official metric of each GLUE task (Wang et al., 2018): accuracy; accuracy and binary F1
(positive class 1) for MRPC and QQP; Matthews correlation for CoLA; Pearson and Spearman correlation for STS-B."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted labels (class ids), or predicted scores for STS-B.
    references: gold labels (class ids), or gold scores for STS-B.
Returns: a dict with some of "accuracy", "f1", "matthews_correlation", "pearson", "spearmanr".
"""

_CITATION = """@inproceedings{wang2019glue, title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural
Language Understanding}, author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer
and Bowman, Samuel R.}, booktitle={ICLR}, year={2019}}"""


def accuracy(predictions: np.ndarray, references: np.ndarray) -> float:
    """Share of exact matches."""
    return float(np.mean(predictions == references))


def binary_f1(predictions: np.ndarray, references: np.ndarray) -> float:
    """F1 of the positive class (label 1); 0 when there are no positives at all."""
    tp = float(np.sum((predictions == 1) & (references == 1)))
    fp = float(np.sum((predictions == 1) & (references != 1)))
    fn = float(np.sum((predictions != 1) & (references == 1)))
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator > 0 else 0.0


def matthews_correlation(predictions: np.ndarray, references: np.ndarray) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K); 0 when either side is constant."""
    classes, encoded = np.unique(np.concatenate([references, predictions]), return_inverse=True)
    true_ids, pred_ids = encoded[: len(references)], encoded[len(references) :]
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (true_ids, pred_ids), 1.0)
    true_counts, pred_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    correct, total = np.trace(confusion), confusion.sum()
    covariance = correct * total - pred_counts @ true_counts
    denominator = np.sqrt((total**2 - pred_counts @ pred_counts) * (total**2 - true_counts @ true_counts))
    return float(covariance / denominator) if denominator > 0 else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation coefficient; NaN when either input is constant."""
    x = np.asarray(x, dtype=np.float64) - np.mean(x)
    y = np.asarray(y, dtype=np.float64) - np.mean(y)
    denominator = np.sqrt(np.dot(x, x) * np.dot(y, y))
    if denominator == 0:
        return float("nan")
    return float(np.clip(np.dot(x, y) / denominator, -1.0, 1.0))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of their ranks."""
    values = np.asarray(values)
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (Pearson correlation of tie-averaged ranks)."""
    return pearson(average_ranks(x), average_ranks(y))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GlueMetric(evaluate.Metric):
    """`evaluate.Metric` with one configuration per GLUE task (``config_name="cola"``, ...)."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in TASKS:
            raise KeyError(f"Unknown GLUE task {self.config_name!r}; choose one of: {', '.join(TASKS)}.")
        value_type = "float32" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value(value_type), "references": datasets.Value(value_type)}
            ),
            format="numpy",
        )

    def _compute(self, predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
        predictions, references = np.asarray(predictions), np.asarray(references)
        if self.config_name == "cola":
            return {"matthews_correlation": matthews_correlation(predictions, references)}
        if self.config_name == "stsb":
            return {"pearson": pearson(predictions, references), "spearmanr": spearman(predictions, references)}
        if self.config_name in F1_TASKS:
            return {"accuracy": accuracy(predictions, references), "f1": binary_f1(predictions, references)}
        return {"accuracy": accuracy(predictions, references)}
