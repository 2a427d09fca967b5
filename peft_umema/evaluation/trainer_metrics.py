"""`compute_metrics` for the Hugging Face Trainer: task scores plus the calibration figures, from the eval logits.

```python
from peft_umema.evaluation.trainer_metrics import make_compute_metrics

trainer = Trainer(..., compute_metrics=make_compute_metrics())                            # sequence tasks
trainer = Trainer(..., compute_metrics=make_compute_metrics("TOKEN_CLS", label_names))   # BIO taggers
```

Sequence tasks get accuracy and macro-F1, token tasks entity-span precision, recall and F1 (seqeval, strict IOB2)
and token accuracy; both get ECE, NLL, Brier, error-detection AUROC and AURC of the softmax of the logits the
model returns (a UMEMA model returns its calibrated logits). The Trainer prefixes every key with `eval_`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .metrics import IGNORE_INDEX, classification_metrics, token_classification_metrics

TASK_TYPES = ("SEQ_CLS", "TOKEN_CLS")


def make_compute_metrics(
    task_type: str = "SEQ_CLS", label_names: Sequence[str] | None = None
) -> Callable[[object], dict[str, float]]:
    """A `compute_metrics(eval_prediction)` for `Trainer`; token tasks need the tag of each class id."""
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
    if task_type == "TOKEN_CLS" and not label_names:
        raise ValueError('task_type="TOKEN_CLS" needs label_names, the BIO tag of each class id (e.g. "B-PER")')
    names = list(label_names) if label_names is not None else None

    def compute_metrics(eval_prediction) -> dict[str, float]:
        logits, labels = _logits_and_labels(eval_prediction)
        probs = _softmax(logits)
        if task_type == "SEQ_CLS":
            if probs.ndim != 2:
                raise ValueError(f"sequence classification needs logits [N, C], got shape {probs.shape}")
            return classification_metrics(probs, labels)
        if probs.ndim != 3:
            raise ValueError(f"token classification needs logits [N, T, C], got shape {probs.shape}")
        if names is not None and len(names) != probs.shape[-1]:
            raise ValueError(f"{len(names)} label names for {probs.shape[-1]} classes")
        return token_classification_metrics(probs, labels, names)

    return compute_metrics


def _logits_and_labels(eval_prediction) -> tuple[np.ndarray, np.ndarray]:
    """The Trainer hands `predictions` as one array, or a tuple whose first entry is the logits when the model
    returns more outputs (a UMEMA model adds its confidence and uncertainties)."""
    predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
    if isinstance(predictions, (tuple, list)):
        predictions = predictions[0]
    if isinstance(labels, (tuple, list)):
        labels = labels[0]
    return np.asarray(predictions, dtype=np.float64), np.asarray(labels).astype(np.int64)


def _softmax(logits: np.ndarray) -> np.ndarray:
    # The Trainer pads token logits of shorter batches with -100, where the labels are -100 too: rows dropped later
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


__all__ = ["IGNORE_INDEX", "TASK_TYPES", "make_compute_metrics"]
