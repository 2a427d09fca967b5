"""Task and calibration metrics: one implementation for training, baselines and benchmarks.

Inputs may be numpy arrays, torch tensors or lists. ``probs`` are class probabilities (softmax outputs, not
logits), ``confidences`` the score a method attaches to each prediction (by default its maximum probability) and
``correct`` whether each prediction was right. Where torchmetrics or seqeval compute a metric, we call them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from seqeval.metrics import f1_score as span_f1_score
from seqeval.metrics import precision_score as span_precision_score
from seqeval.metrics import recall_score as span_recall_score
from seqeval.scheme import IOB2
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_calibration_error,
    multiclass_f1_score,
)

from ..constants import IGNORE_INDEX, OUTSIDE_TAG

# Floor on the probability of the true class, so that one confident mistake gives a large but finite NLL.
PROBABILITY_FLOOR = 1e-12
# Rows of ``probs`` must sum to 1 within this; loose enough for half-precision softmax outputs.
ROW_SUM_TOLERANCE = 1e-2


def _to_numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        return (values.double() if values.is_floating_point() else values).numpy()
    return np.asarray(values)


def _check_confidences(confidences, correct) -> tuple[np.ndarray, np.ndarray]:
    confidences = _to_numpy(confidences).astype(np.float64)
    correct = _to_numpy(correct)
    if confidences.ndim != 1 or correct.ndim != 1:
        raise ValueError(
            f"confidences and correct must be 1-D (one value per prediction), got shapes {confidences.shape} and "
            f"{correct.shape}."
        )
    if len(confidences) != len(correct):
        raise ValueError(
            f"confidences and correct must have the same length, got {len(confidences)} and {len(correct)}."
        )
    if len(confidences) == 0:
        raise ValueError("Need at least one prediction, got none.")
    if not np.all((confidences >= 0.0) & (confidences <= 1.0)):
        raise ValueError(
            f"confidences must lie in [0, 1], got values from {np.nanmin(confidences)} to {np.nanmax(confidences)} "
            "(or NaN); pass probabilities, not logits."
        )
    if not np.isin(correct, (0, 1)).all():
        raise ValueError("correct must hold booleans or 0/1 (whether each prediction was right).")
    return confidences, correct.astype(bool)


def _check_probs(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    probs = _to_numpy(probs).astype(np.float64)
    labels = _to_numpy(labels)
    if probs.ndim != 2 or labels.ndim != 1 or len(probs) != len(labels):
        raise ValueError(f"Expected probs [N, C] and labels [N], got shapes {probs.shape} and {labels.shape}.")
    if len(labels) == 0:
        raise ValueError("Need at least one example, got none.")
    if probs.shape[1] < 2:
        raise ValueError(f"Expected at least 2 classes, got probs with {probs.shape[1]} column(s).")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(
            f"labels must be class ids in [0, {probs.shape[1] - 1}], got {labels.min()} to {labels.max()}."
        )
    row_sums = probs.sum(axis=1)
    worst = int(np.argmax(np.abs(row_sums - 1.0)))
    if probs.min() < 0.0 or not np.isfinite(row_sums).all() or abs(row_sums[worst] - 1.0) > ROW_SUM_TOLERANCE:
        raise ValueError(
            f"probs must be class probabilities whose rows sum to 1 (row {worst} sums to {row_sums[worst]:.4g}); "
            "apply softmax to logits first."
        )
    return probs, labels.astype(np.int64)


def expected_calibration_error(confidences, correct, n_bins: int = 15) -> float:
    """ECE over ``n_bins`` equal-width bins: sum over bins b of |B_b|/N * |accuracy_b - mean confidence_b|.

    Computed by torchmetrics, whose bins are [lo, hi) and which gives confidence exactly 1.0 a bin of its own.
    """
    confidences, correct = _check_confidences(confidences, correct)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}.")
    return float(
        binary_calibration_error(torch.from_numpy(confidences), torch.from_numpy(correct.astype(np.int64)), n_bins)
    )


def calibration_bins(confidences, correct, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per equal-width bin: ``edges`` (n_bins + 1), ``accuracy``, ``confidence`` (mean) and ``count``.

    Bins are [lo, hi) with confidence 1.0 in the last bin; empty bins have accuracy and confidence NaN. Used to draw
    reliability diagrams.
    """
    confidences, correct = _check_confidences(confidences, correct)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}.")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bin_of = np.minimum((confidences * n_bins).astype(int), n_bins - 1)
    count = np.bincount(bin_of, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(bin_of, weights=correct, minlength=n_bins) / count
        confidence = np.bincount(bin_of, weights=confidences, minlength=n_bins) / count
    return {"edges": edges, "accuracy": accuracy, "confidence": confidence, "count": count}


def negative_log_likelihood(probs, labels) -> float:
    """Mean over examples of -log p(true class), with p floored at ``PROBABILITY_FLOOR``."""
    probs, labels = _check_probs(probs, labels)
    true_class = probs[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(true_class, PROBABILITY_FLOOR, 1.0)).mean())


def brier_score(probs, labels) -> float:
    """Mean over examples of the sum over classes of (p_c - onehot_c)^2 (ranges from 0 to 2)."""
    probs, labels = _check_probs(probs, labels)
    squared_errors = probs**2
    rows = np.arange(len(labels))
    squared_errors[rows, labels] = (probs[rows, labels] - 1.0) ** 2
    return float(squared_errors.sum(axis=1).mean())


def error_detection_auroc(confidences, correct) -> float:
    """AUROC of flagging mistakes by low confidence (errors are the positive class, score = -confidence).

    0.5 is a confidence that says nothing about errors, 1.0 one that ranks every error below every correct
    prediction. NaN when the predictions are all right or all wrong: there is nothing to separate.
    """
    confidences, correct = _check_confidences(confidences, correct)
    errors = ~correct
    if errors.all() or not errors.any():
        return math.nan
    # 1 - confidence ranks as -confidence and stays in [0, 1], where torchmetrics takes scores as probabilities.
    return float(binary_auroc(torch.from_numpy(1.0 - confidences), torch.from_numpy(errors.astype(np.int64))))


def risk_coverage_auc(confidences, correct) -> float:
    """Area under the risk-coverage curve (AURC): lower is better.

    Predictions are sorted by confidence, highest first; at coverage k/N the risk is the error rate of the top k,
    and the AURC is the mean risk over k = 1..N. Predictions of equal confidence have no order, so within a tie we
    take the expected risk over their orderings (errors spread evenly across the tied block).
    """
    confidences, correct = _check_confidences(confidences, correct)
    order = np.argsort(-confidences, kind="stable")
    sorted_confidences = confidences[order]
    errors = (~correct[order]).astype(np.float64)
    block_starts = np.flatnonzero(np.r_[True, sorted_confidences[1:] != sorted_confidences[:-1]])
    block_sizes = np.diff(np.r_[block_starts, len(errors)])
    errors_before = np.r_[0.0, np.cumsum(errors)][block_starts]
    block_errors = np.add.reduceat(errors, block_starts)
    rank_in_block = np.arange(len(errors)) - np.repeat(block_starts, block_sizes) + 1
    expected_errors = np.repeat(errors_before, block_sizes) + rank_in_block * np.repeat(
        block_errors / block_sizes, block_sizes
    )
    return float(np.mean(expected_errors / np.arange(1, len(errors) + 1)))


def _calibration_metrics(probs: np.ndarray, labels: np.ndarray, confidences) -> dict[str, float]:
    correct = probs.argmax(axis=1) == labels
    confidences = probs.max(axis=1) if confidences is None else _to_numpy(confidences)
    if np.shape(confidences) != np.shape(labels):
        raise ValueError(
            f"confidences must have one value per labelled prediction: expected shape {labels.shape}, got "
            f"{np.shape(confidences)}."
        )
    return {
        "accuracy": float(correct.mean()),
        "ece": expected_calibration_error(confidences, correct),
        "nll": negative_log_likelihood(probs, labels),
        "brier": brier_score(probs, labels),
        "auroc_error": error_detection_auroc(confidences, correct),
        "aurc": risk_coverage_auc(confidences, correct),
    }


def classification_metrics(probs, labels, confidences=None) -> dict[str, float]:
    """Accuracy, macro-F1 and the calibration metrics of a sequence classifier.

    Args:
        probs: class probabilities, [N, C].
        labels: true class ids, [N].
        confidences: score of each prediction, [N]; defaults to the maximum probability.

    Returns:
        ``accuracy``, ``macro_f1`` (over the classes that occur in labels or predictions), ``ece``, ``nll``,
        ``brier``, ``auroc_error`` and ``aurc``.
    """
    probs, labels = _check_probs(probs, labels)
    metrics = _calibration_metrics(probs, labels, confidences)
    macro_f1 = multiclass_f1_score(
        torch.from_numpy(probs.argmax(axis=1)), torch.from_numpy(labels), num_classes=probs.shape[1], average="macro"
    )
    return {"accuracy": metrics.pop("accuracy"), "macro_f1": float(macro_f1), **metrics}


def token_classification_metrics(probs, labels, label_names, confidences=None) -> dict[str, float]:
    """Entity-span scores and token-level calibration of a BIO tagger.

    Spans follow the paper's decoding (a ``B-`` tag and the contiguous ``I-`` tags of its type), scored by seqeval in
    strict IOB2 mode, so a predicted span starting with ``I-`` counts as no span. Only positions whose label is not
    -100 (first sub-tokens of words) count.

    Args:
        probs: [B, T, C] probabilities, or a list of per-sentence [T_i, C] arrays.
        labels: [B, T] tag ids with -100 where nothing is scored, or a list of per-sentence [T_i] arrays.
        label_names: the tag of each class id, e.g. ``["O", "B-PER", "I-PER"]``.
        confidences: per-token scores shaped like ``labels``; default the maximum probability.

    Returns:
        span ``precision``, ``recall``, ``f1``; token ``accuracy``; ``ece``, ``nll``, ``brier``,
        ``auroc_error``, ``aurc`` over the scored tokens; and ``entity_ece``, ``entity_nll`` over the tokens whose gold
        tag is not ``O`` (when there are any).
    """
    label_names = list(label_names)
    sentence_probs = _per_sentence(probs, "probs")
    sentence_labels = _per_sentence(labels, "labels")
    sentence_confidences = None if confidences is None else _per_sentence(confidences, "confidences")
    if len(sentence_probs) != len(sentence_labels) or (
        sentence_confidences is not None and len(sentence_confidences) != len(sentence_labels)
    ):
        raise ValueError("probs, labels and confidences must hold the same number of sentences.")

    gold_tags, predicted_tags, kept_probs, kept_labels, kept_confidences = [], [], [], [], []
    for row, (row_probs, row_labels) in enumerate(zip(sentence_probs, sentence_labels)):
        if row_probs.ndim != 2 or row_labels.shape != row_probs.shape[:1] or row_probs.shape[1] != len(label_names):
            raise ValueError(
                f"Sentence {row}: expected probs [T, {len(label_names)}] (one column per label name) and labels [T], "
                f"got shapes {row_probs.shape} and {row_labels.shape}."
            )
        scored = row_labels != IGNORE_INDEX
        if not scored.any():
            continue
        kept_probs.append(row_probs[scored])
        kept_labels.append(row_labels[scored])
        if sentence_confidences is not None:
            kept_confidences.append(np.reshape(sentence_confidences[row], row_labels.shape)[scored])
    if not kept_labels:
        raise ValueError("No scored tokens: every label is -100.")

    all_probs, all_labels = _check_probs(np.concatenate(kept_probs), np.concatenate(kept_labels))
    boundaries = np.cumsum([len(sentence) for sentence in kept_labels])[:-1]
    for gold, predicted in zip(np.split(all_labels, boundaries), np.split(all_probs.argmax(axis=1), boundaries)):
        gold_tags.append([label_names[tag] for tag in gold])
        predicted_tags.append([label_names[tag] for tag in predicted])
    span_options = {"mode": "strict", "scheme": IOB2, "zero_division": 0}
    metrics = _calibration_metrics(
        all_probs, all_labels, np.concatenate(kept_confidences) if sentence_confidences is not None else None
    )
    entity = np.array([label_names[tag] != OUTSIDE_TAG for tag in all_labels])
    if entity.any():  # most tokens are O: calibration over them alone says little about the entities
        entity_confidences = (all_probs.max(axis=1) if sentence_confidences is None
                              else np.concatenate(kept_confidences))[entity]
        entity_correct = all_probs[entity].argmax(axis=1) == all_labels[entity]
        metrics["entity_ece"] = expected_calibration_error(entity_confidences, entity_correct)
        metrics["entity_nll"] = negative_log_likelihood(all_probs[entity], all_labels[entity])
    return {
        "precision": float(span_precision_score(gold_tags, predicted_tags, **span_options)),
        "recall": float(span_recall_score(gold_tags, predicted_tags, **span_options)),
        "f1": float(span_f1_score(gold_tags, predicted_tags, **span_options)),
        **metrics,
    }


def _per_sentence(values, name: str) -> list[np.ndarray]:
    """Rows of a padded [B, T, ...] array, or the arrays of a per-sentence list."""
    if isinstance(values, (list, tuple)):
        return [_to_numpy(sentence) for sentence in values]
    values = _to_numpy(values)
    if values.ndim < 2:
        raise ValueError(
            f"{name} must be batched per sentence ([B, T, ...] or a list of arrays), got shape {values.shape}."
        )
    return list(values)
