"""Reliability diagrams (accuracy per confidence bin against the diagonal), written as PNG files.

Figures are drawn on ``matplotlib.figure.Figure`` objects rendered by the Agg backend, without pyplot: nothing
global changes, no display is needed, and it is safe from training callbacks and worker threads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .metrics import calibration_bins, expected_calibration_error


def save_reliability_diagram(
    confidences, correct, path: str | os.PathLike, title: str = "Reliability diagram", n_bins: int = 15
) -> Path:
    """Write one method's reliability diagram to ``path`` (PNG) and return the path.

    Top: accuracy per confidence bin as bars, the gap to the bin's mean confidence, the diagonal of perfect
    calibration and the ECE in the legend. Bottom: how many predictions fall in each bin.
    """
    bins = calibration_bins(confidences, correct, n_bins)
    ece = expected_calibration_error(confidences, correct, n_bins)
    edges, count = bins["edges"], bins["count"]
    filled, width = count > 0, 1.0 / n_bins
    mean_confidence = np.sum(bins["confidence"][filled] * count[filled]) / count.sum()
    accuracy = np.sum(bins["accuracy"][filled] * count[filled]) / count.sum()

    figure = Figure(figsize=(5.0, 6.0), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    left, bin_accuracy, bin_confidence = edges[:-1][filled], bins["accuracy"][filled], bins["confidence"][filled]
    top.bar(left, bin_accuracy, width=width, align="edge", color="tab:blue", edgecolor="black", label="Accuracy")
    top.bar(
        left, bin_confidence - bin_accuracy, width=width, align="edge", bottom=bin_accuracy, color="tab:red",
        alpha=0.3, hatch="//", edgecolor="tab:red", label="Gap",
    )
    top.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="gray", label="Perfect calibration")
    top.set(ylim=(0.0, 1.0), ylabel="Accuracy", title=title)
    top.legend(loc="upper left", title=f"ECE = {ece:.4f}")

    bottom.bar(edges[:-1], count, width=width, align="edge", color="tab:blue", edgecolor="black")
    bottom.axvline(mean_confidence, color="tab:red", linestyle="--", label=f"Mean confidence {mean_confidence:.3f}")
    bottom.axvline(accuracy, color="black", linestyle=":", label=f"Accuracy {accuracy:.3f}")
    bottom.set(xlim=(0.0, 1.0), xlabel="Confidence", ylabel="Count")
    bottom.legend(loc="upper left", fontsize="small")
    return _save(figure, path)


def save_reliability_comparison(
    results: Mapping[str, tuple], path: str | os.PathLike, title: str = "Reliability comparison", n_bins: int = 15
) -> Path:
    """Overlay the reliability curves of several methods, ``{name: (confidences, correct)}``, in one PNG.

    Top: accuracy against mean confidence per non-empty bin for each method, with its ECE in the legend, and the
    diagonal. Bottom: each method's share of predictions per bin, so methods evaluated on different sizes compare.
    """
    if not results:
        raise ValueError("results is empty: pass {method name: (confidences, correct)}.")
    figure = Figure(figsize=(5.5, 6.0), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    top.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="gray", label="Perfect calibration")
    for name, (confidences, correct) in results.items():
        bins = calibration_bins(confidences, correct, n_bins)
        ece = expected_calibration_error(confidences, correct, n_bins)
        filled = bins["count"] > 0
        (line,) = top.plot(
            bins["confidence"][filled], bins["accuracy"][filled], marker="o", label=f"{name} (ECE = {ece:.4f})"
        )
        bottom.stairs(bins["count"] / bins["count"].sum(), bins["edges"], color=line.get_color(), linewidth=1.5)
    top.set(xlim=(0.0, 1.0), ylim=(0.0, 1.0), ylabel="Accuracy", title=title)
    top.legend(loc="upper left", fontsize="small")
    bottom.set(xlabel="Confidence", ylabel="Share of predictions")
    return _save(figure, path)


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, format="png")
    return path
