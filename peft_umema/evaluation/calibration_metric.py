"""The calibration figures as a Hugging Face `evaluate` metric, loadable offline by path.

```python
import evaluate
from peft_umema.evaluation import CALIBRATION_METRIC_PATH

calibration = evaluate.load(CALIBRATION_METRIC_PATH)
calibration.compute(predictions=probs, references=labels)                # probs [N, C], labels [N]
calibration.compute(predictions=probs, references=labels, confidences=c, n_bins=10)
evaluate.combine([calibration, other_metric_taking_probabilities])
```

`evaluate.load` copies this file into its module cache and imports it there, so it imports the package absolutely;
the figures themselves come from `peft_umema.evaluation.metrics`, the one definition the rest of the package uses.
"""

import datasets
import evaluate
import numpy as np

from peft_umema.evaluation.metrics import (
    brier_score,
    error_detection_auroc,
    expected_calibration_error,
    negative_log_likelihood,
    risk_coverage_auc,
)

_DESCRIPTION = """Calibration and selective-prediction figures of a classifier's probabilities: expected calibration
error (ECE, equal-width bins), negative log-likelihood (NLL), Brier score, error-detection AUROC (how well low
confidence flags mistakes) and the area under the risk-coverage curve (AURC). Token taggers: pass the scored
tokens only, one row each."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: class probabilities, one list of C floats per example (softmax outputs, not logits).
    references: the true class id of each example.
    confidences: optional, the score each prediction is ranked by for ECE, AUROC and AURC (for instance an
        uncertainty method's own confidence); default the maximum probability.
    n_bins: number of ECE bins, default 15.
Returns:
    ece, nll, brier, auroc_error (NaN when the predictions are all right or all wrong), aurc.
Examples:
    >>> calibration = evaluate.load(CALIBRATION_METRIC_PATH)
    >>> calibration.compute(predictions=[[0.9, 0.1], [0.3, 0.7]], references=[0, 0])["brier"]
    0.5
"""

_CITATION = """@inproceedings{guo2017calibration,
  title={On Calibration of Modern Neural Networks},
  author={Guo, Chuan and Pleiss, Geoff and Sun, Yu and Weinberger, Kilian Q.},
  booktitle={ICML},
  year={2017}
}"""

_PROBABILITIES = datasets.Sequence(datasets.Value("float64"))


class CalibrationMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # evaluate picks the first format an example fits
            features=[
                datasets.Features({"predictions": _PROBABILITIES, "references": datasets.Value("int64")}),
                datasets.Features(
                    {
                        "predictions": _PROBABILITIES,
                        "references": datasets.Value("int64"),
                        "confidences": datasets.Value("float64"),
                    }
                ),
            ],
        )

    def _compute(self, predictions, references, confidences=None, n_bins=15):
        probs = np.asarray(predictions, dtype=np.float64)
        labels = np.asarray(references, dtype=np.int64)
        nll = negative_log_likelihood(probs, labels)  # checks the shapes and that rows are probabilities
        correct = probs.argmax(axis=1) == labels
        scores = probs.max(axis=1) if confidences is None else np.asarray(confidences, dtype=np.float64)
        return {
            "ece": expected_calibration_error(scores, correct, n_bins=n_bins),
            "nll": nll,
            "brier": brier_score(probs, labels),
            "auroc_error": error_detection_auroc(scores, correct),
            "aurc": risk_coverage_auc(scores, correct),
        }
