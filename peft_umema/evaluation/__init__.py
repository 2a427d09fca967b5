"""Task and calibration metrics, and reliability diagrams, shared by training, baselines and benchmarks.

- `metrics`: the one definition of each figure (accuracy, macro-F1, span F1, ECE, NLL, Brier, AUROC, AURC).
- `CALIBRATION_METRIC_PATH`: the calibration figures as an `evaluate` metric, `evaluate.load(CALIBRATION_METRIC_PATH)`
  (offline; composable with `evaluate.combine`).
- `trainer_metrics.make_compute_metrics`: a `compute_metrics` for the HF Trainer.
- `reliability`: reliability diagrams.
"""

from pathlib import Path

CALIBRATION_METRIC_PATH = str(Path(__file__).resolve().with_name("calibration_metric.py"))
