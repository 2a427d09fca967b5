"""Which inputs detect a trained UMEMA run's errors: the calibrated softmax, the memory's novelty, UM's own
confidence and aleatoric / epistemic terms, alone and stacked by a logistic fit on dev, scored on test.

    python benchmarks/confidence_forms.py RUN_FOLDER DATA

RUN_FOLDER is a UMEMA run folder with its adapter (e.g. a `reproduce` cell's `run/` kept with --keep-adapters), DATA
the benchmark it was trained on. Collects dev and test once (`calibration_study.collect`), fits one temperature on
dev, and prints the test error-detection AUROC of each score (higher = ranks wrong predictions lower).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import calibration_study
import numpy as np
import torch
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from peft_umema.uncertainty.calibrator import LOGIT_FEATURES, UNCERTAINTY_FEATURES

# scores where a larger value means "more likely right"; the others are uncertainties
CONFIDENCES = ("logit_max_prob", "margin", "um_confidence")
STACKS = (("logit_max_prob", "novelty"), ("logit_max_prob", "um_confidence"),
          ("logit_max_prob", "entropy", "margin", "novelty", "aleatoric", "epistemic", "um_confidence"))


def _temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    log_t = torch.zeros(1, dtype=logits.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def _scores(split: dict, temperature: float) -> tuple[dict[str, np.ndarray], np.ndarray]:
    logits = split["raw_logits"] / temperature
    probs = torch.softmax(logits, -1)
    top2 = probs.topk(2, -1).values
    memory_dim = split["features"].shape[1] - len(UNCERTAINTY_FEATURES) - len(LOGIT_FEATURES)
    uncertainty = {name: split["features"][:, memory_dim + i] for i, name in enumerate(UNCERTAINTY_FEATURES)}
    scores = {
        "logit_max_prob": torch.logit(top2[:, 0], eps=1e-6),
        "margin": top2[:, 0] - top2[:, 1],
        "entropy": -(probs * probs.clamp_min(1e-12).log()).sum(-1),
        "um_confidence": torch.logit(split["um_confidence"], eps=1e-6),
        **uncertainty,
    }
    correct = (logits.argmax(-1) == split["labels"]).numpy()
    return {name: value.numpy() for name, value in scores.items()}, correct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_folder", type=Path)
    parser.add_argument("data")
    args = parser.parse_args()
    calibration_study.collect(args.run_folder, args.data)
    tensors = load_file(args.run_folder / calibration_study.INPUTS_NAME)
    dev, test = (calibration_study._split(tensors, name) for name in ("validation", "test"))
    temperature = _temperature(dev["raw_logits"], dev["labels"])
    dev_scores, dev_correct = _scores(dev, temperature)
    test_scores, test_correct = _scores(test, temperature)
    print(f"dev temperature {temperature:.3f}; {len(dev_correct)} dev and {len(test_correct)} test positions, "
          f"test accuracy {test_correct.mean():.4f}")
    print("| score | test error AUROC |\n|---|---:|")
    for name, values in test_scores.items():
        print(f"| {name} | {roc_auc_score(test_correct, values if name in CONFIDENCES else -values):.4f} |")
    for stack in STACKS:
        fit_inputs = np.stack([dev_scores[name] for name in stack], 1)
        mean, std = fit_inputs.mean(0), fit_inputs.std(0) + 1e-9
        fit = LogisticRegression().fit((fit_inputs - mean) / std, dev_correct)
        stacked = fit.decision_function((np.stack([test_scores[name] for name in stack], 1) - mean) / std)
        print(f"| logistic stack of {' + '.join(stack)} | {roc_auc_score(test_correct, stacked):.4f} |")


if __name__ == "__main__":
    main()
