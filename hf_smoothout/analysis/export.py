"""Writing analysis results to disk: the stable file names under ``<output_dir>/analysis/``.

Files (names are stable; model cards embed whatever is in the folder):

* ``sharpness.json`` -- :func:`save_sharpness`: ``{"measures": {name: result dict}, ...context}``,
  each measure with at least ``value`` and ``std``.
* ``landscape_<kind>.png`` -- the plot, ``<kind>`` one of ``interpolation``, ``random_1d``,
  ``random_2d``; ``FIGURE_SIZE`` inches at ``FIGURE_DPI`` (960 x 640 pixels by default).
* ``landscape_<kind>.csv`` -- one row per point: ``alpha`` (and ``beta`` for 2-D) then one column per
  curve (``train_loss``, ``train_accuracy``, ``validation_loss``, ...); empty cell for NaN.
* ``landscape_<kind>.json`` -- :meth:`LandscapeResult.to_dict` (``kind``, ``alphas``, ``betas``,
  ``metrics``, ``info``) with NaN written as ``null``.

Example:
    >>> import tempfile
    >>> from hf_smoothout.analysis.landscape import LandscapeResult
    >>> result = LandscapeResult("random_1d", [-1.0, 0.0, 1.0], {"train_loss": [2.0, 1.0, 2.5]})
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     paths = save_landscape(result, folder)
    ...     sorted(p.name for p in paths.values())
    ['landscape_random_1d.csv', 'landscape_random_1d.json', 'landscape_random_1d.png']
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .landscape import LandscapeResult

ANALYSIS_DIR = "analysis"
SHARPNESS_FILE = "sharpness.json"
LANDSCAPE_STEM = "landscape_{kind}"
FIGURE_SIZE = (9.6, 6.4)
FIGURE_DPI = 100


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats replaced by ``None`` and numpy/torch scalars made plain (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(data: dict[str, Any], path: str | Path) -> Path:
    """Write strict JSON (``allow_nan=False``), creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")
    return path


def save_sharpness(measures: dict[str, Any], output_dir: str | Path, **context: Any) -> Path:
    """Write ``sharpness.json`` in ``output_dir``: ``measures`` (name -> result or dict) plus ``context`` keys."""
    results = {name: r.to_dict() if hasattr(r, "to_dict") else dict(r) for name, r in measures.items()}
    return write_json({**context, "measures": results}, Path(output_dir) / SHARPNESS_FILE)


def _csv_cell(value: float) -> str:
    return "" if value is None or not math.isfinite(value) else repr(float(value))


def _write_csv(result: LandscapeResult, path: Path) -> None:
    names = list(result.metrics)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        if result.betas is None:
            writer.writerow(["alpha", *names])
            for i, alpha in enumerate(result.alphas):
                writer.writerow([repr(alpha), *(_csv_cell(result.metrics[n][i]) for n in names)])
        else:
            writer.writerow(["alpha", "beta", *names])
            for i, alpha in enumerate(result.alphas):
                for j, beta in enumerate(result.betas):
                    writer.writerow([repr(alpha), repr(beta), *(_csv_cell(result.metrics[n][i][j]) for n in names)])


def _has_values(values: Any) -> bool:
    return bool(np.isfinite(np.asarray(values, dtype=np.float64)).any())


def _plot(result: LandscapeResult, path: Path, figure_size: tuple[float, float], dpi: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figure_size, dpi=dpi, layout="constrained")  # fixed size; labels kept apart
    FigureCanvasAgg(figure)  # the Agg canvas, no pyplot: no global state, no GUI
    title = {
        "interpolation": "Linear interpolation  theta = alpha * theta_B + (1 - alpha) * theta_A",
        "random_1d": "Random filter-normalized direction  theta + alpha * d",
        "random_2d": "Random filter-normalized directions  theta + alpha * d1 + beta * d2",
    }.get(result.kind, result.kind)
    splits = result.splits
    if result.betas is None:
        axis = figure.add_subplot(1, 1, 1)
        accuracy_axis = None
        colors = {}
        for k, split in enumerate(splits):
            color = f"C{k}"
            colors[split] = color
            axis.plot(result.alphas, result.metrics[f"{split}_loss"], "-o", color=color, ms=3, label=f"{split} loss")
            accuracies = result.metrics.get(f"{split}_accuracy")
            if accuracies is not None and _has_values(accuracies):
                accuracy_axis = accuracy_axis or axis.twinx()
                accuracy_axis.plot(result.alphas, accuracies, "--", color=color, label=f"{split} accuracy")
        axis.set_xlabel("alpha")
        axis.set_ylabel("loss")
        handles, labels = axis.get_legend_handles_labels()
        if accuracy_axis is not None:
            accuracy_axis.set_ylabel("accuracy")
            more_handles, more_labels = accuracy_axis.get_legend_handles_labels()
            handles, labels = handles + more_handles, labels + more_labels
        for marker in (0.0, 1.0) if result.kind == "interpolation" else (0.0,):
            axis.axvline(marker, color="grey", lw=0.8, ls=":")
        axis.legend(handles, labels, loc="best", fontsize="small")
        axis.set_title(title, fontsize="medium")
    else:
        for k, split in enumerate(splits):
            axis = figure.add_subplot(1, len(splits), k + 1)
            values = np.asarray(result.metrics[f"{split}_loss"], dtype=np.float64).T  # rows: beta
            contour = axis.contourf(result.alphas, result.betas, values, levels=20, cmap="viridis")
            axis.contour(result.alphas, result.betas, values, levels=10, colors="white", linewidths=0.5)
            figure.colorbar(contour, ax=axis)
            axis.plot([0.0], [0.0], "r+", ms=10)
            axis.set_xlabel("alpha")
            axis.set_ylabel("beta")
            axis.set_title(f"{split} loss", fontsize="medium")
        figure.suptitle(title, fontsize="medium")
    figure.savefig(path, dpi=dpi, format="png")


def save_landscape(
    result: LandscapeResult,
    output_dir: str | Path,
    *,
    figure_size: tuple[float, float] = FIGURE_SIZE,
    dpi: int = FIGURE_DPI,
) -> dict[str, Path]:
    """Write ``landscape_<kind>.png``, ``.csv`` and ``.json`` into ``output_dir``; returns ``{"png": ..., ...}``.

    The PNG is exactly ``figure_size * dpi`` pixels (no tight cropping).
    """
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stem = LANDSCAPE_STEM.format(kind=result.kind)
    paths = {ext: folder / f"{stem}.{ext}" for ext in ("png", "csv", "json")}
    _plot(result, paths["png"], figure_size, dpi)
    _write_csv(result, paths["csv"])
    write_json(result.to_dict(), paths["json"])
    return paths
