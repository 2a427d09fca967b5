"""Metrics against values computed by hand, and the reliability diagrams."""

import math
import warnings

import numpy as np
import pytest
import torch

from peft_umema.evaluation.metrics import (
    brier_score,
    calibration_bins,
    classification_metrics,
    error_detection_auroc,
    expected_calibration_error,
    negative_log_likelihood,
    risk_coverage_auc,
    token_classification_metrics,
)
from peft_umema.evaluation.reliability import (
    save_reliability_comparison,
    save_reliability_diagram,
)

# Four examples, three classes:
#   probs               label  prediction  confidence  correct
#   [0.50, 0.30, 0.20]  0      0           0.50        yes
#   [0.30, 0.55, 0.15]  2      1           0.55        no
#   [0.05, 0.05, 0.90]  2      2           0.90        yes
#   [0.45, 0.35, 0.20]  1      0           0.45        no
PROBS = np.array([[0.50, 0.30, 0.20], [0.30, 0.55, 0.15], [0.05, 0.05, 0.90], [0.45, 0.35, 0.20]])
LABELS = np.array([0, 2, 2, 1])
CONFIDENCES = np.array([0.50, 0.55, 0.90, 0.45])
CORRECT = np.array([True, False, True, False])


def test_accuracy_and_macro_f1_by_hand():
    # predictions [0, 1, 2, 0] vs labels [0, 2, 2, 1]:
    # class 0: tp 1, fp 1, fn 0 -> F1 2/3; class 1: tp 0 -> F1 0; class 2: tp 1, fp 0, fn 1 -> F1 2/3
    metrics = classification_metrics(PROBS, LABELS)
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["macro_f1"] == pytest.approx(4 / 9)
    assert set(metrics) == {"accuracy", "macro_f1", "ece", "nll", "brier", "auroc_error", "aurc"}


def test_nll_by_hand():
    # true-class probabilities 0.5, 0.15, 0.9, 0.35
    expected = -(math.log(0.5) + math.log(0.15) + math.log(0.9) + math.log(0.35)) / 4
    assert negative_log_likelihood(PROBS, LABELS) == pytest.approx(expected)
    assert expected == pytest.approx(0.93636245)
    reference = torch.nn.functional.nll_loss(torch.log(torch.tensor(PROBS)), torch.tensor(LABELS))
    assert negative_log_likelihood(torch.tensor(PROBS), torch.tensor(LABELS)) == pytest.approx(reference.item())


def test_nll_is_finite_for_a_zero_probability_on_the_true_class():
    assert math.isfinite(negative_log_likelihood([[1.0, 0.0]], [1]))


def test_brier_by_hand():
    # row 1: 0.5^2 + 0.3^2 + 0.2^2 = 0.38;   row 2: 0.3^2 + 0.55^2 + 0.85^2 = 1.115
    # row 3: 0.05^2 + 0.05^2 + 0.1^2 = 0.015; row 4: 0.45^2 + 0.65^2 + 0.2^2 = 0.665  -> mean 2.175 / 4
    assert brier_score(PROBS, LABELS) == pytest.approx(0.54375)


def test_ece_by_hand():
    # 15 bins of width 1/15: the four confidences land in four different bins, so
    # ECE = (|1 - 0.5| + |0 - 0.55| + |1 - 0.9| + |0 - 0.45|) / 4 = 1.6 / 4
    assert expected_calibration_error(CONFIDENCES, CORRECT) == pytest.approx(0.4)
    # 3 bins: [1/3, 2/3) holds 0.5 (right), 0.55 and 0.45 (wrong): accuracy 1/3, mean confidence 0.5;
    # [2/3, 1) holds 0.9 (right). ECE = 3/4 * |1/3 - 0.5| + 1/4 * |1 - 0.9| = 0.125 + 0.025
    assert expected_calibration_error(CONFIDENCES, CORRECT, n_bins=3) == pytest.approx(0.15)
    assert classification_metrics(PROBS, LABELS)["ece"] == pytest.approx(0.4)


def test_ece_matches_a_direct_implementation_on_random_data():
    rng = np.random.default_rng(0)
    confidences = rng.uniform(0.2, 0.999, size=500)
    correct = rng.uniform(size=500) < confidences
    bins = np.floor(confidences * 10).astype(int)
    expected = sum(
        abs(correct[bins == b].mean() - confidences[bins == b].mean()) * (bins == b).mean()
        for b in np.unique(bins)
    )
    assert expected_calibration_error(confidences, correct, n_bins=10) == pytest.approx(expected)


def test_error_detection_auroc_by_hand():
    # (error, correct) pairs by confidence: (0.55, 0.5) ranked wrongly, (0.55, 0.9), (0.45, 0.5), (0.45, 0.9)
    # ranked rightly -> 3 / 4
    assert error_detection_auroc(CONFIDENCES, CORRECT) == pytest.approx(0.75)
    assert error_detection_auroc([0.9, 0.1], [True, False]) == pytest.approx(1.0)
    assert error_detection_auroc([0.5, 0.5], [True, False]) == pytest.approx(0.5)


def test_error_detection_auroc_is_nan_without_warnings_when_one_class():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(error_detection_auroc([0.9, 0.8], [True, True]))
        assert math.isnan(error_detection_auroc([0.9, 0.8], [False, False]))


def test_aurc_by_hand():
    # by confidence: 0.9 right, 0.55 wrong, 0.5 right, 0.45 wrong; risks 0/1, 1/2, 1/3, 2/4
    assert risk_coverage_auc(CONFIDENCES, CORRECT) == pytest.approx((0 + 1 / 2 + 1 / 3 + 2 / 4) / 4)


def test_aurc_spreads_errors_evenly_within_ties():
    # the tied pair at 0.8 holds one error: expected risks 0.5 (k=1), 1/2 (k=2), 1/3 (k=3)
    expected = (0.5 + 0.5 + 1 / 3) / 3
    assert risk_coverage_auc([0.8, 0.8, 0.3], [True, False, True]) == pytest.approx(expected)
    assert risk_coverage_auc([0.8, 0.8, 0.3], [False, True, True]) == pytest.approx(expected)


def test_confidences_override_max_probability():
    metrics = classification_metrics(PROBS, LABELS, confidences=[0.9, 0.1, 0.8, 0.2])
    assert metrics["auroc_error"] == pytest.approx(1.0)
    assert metrics["ece"] == pytest.approx(expected_calibration_error([0.9, 0.1, 0.8, 0.2], CORRECT))


def test_torch_inputs_give_the_same_metrics():
    from_numpy = classification_metrics(PROBS, LABELS)
    from_torch = classification_metrics(torch.tensor(PROBS, dtype=torch.float32), torch.tensor(LABELS))
    for key, value in from_numpy.items():
        assert from_torch[key] == pytest.approx(value, abs=1e-6)


@pytest.mark.parametrize(
    "probs, labels, message",
    [
        ([[2.0, -1.0], [0.5, 0.1]], [0, 1], "softmax"),
        ([[0.5, 0.5]], [2], "class ids"),
        ([[0.5, 0.5], [0.5, 0.5]], [0], "shapes"),
    ],
)
def test_bad_probabilities_are_rejected(probs, labels, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(probs, labels)


def test_bad_confidences_are_rejected():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error([1.5, 0.2], [True, False])
    with pytest.raises(ValueError, match="same length"):
        risk_coverage_auc([0.5, 0.2], [True])


LABEL_NAMES = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def _peaked(tags, confidence=0.8):
    """Rows putting ``confidence`` on each predicted tag id and 0.05 on each of the 4 other tags."""
    rows = np.full((len(tags), len(LABEL_NAMES)), (1 - confidence) / (len(LABEL_NAMES) - 1))
    rows[np.arange(len(tags)), tags] = confidence
    return rows


def _token_case():
    # sentence 1 (position 0 is a special token): gold B-PER I-PER O B-LOC, predicted B-PER I-PER O O
    # sentence 2 (positions 0, 3, 4 unscored):    gold O B-LOC,            predicted O I-LOC
    labels = np.array([[-100, 1, 2, 0, 3], [-100, 0, 3, -100, -100]])
    predicted = np.array([[0, 1, 2, 0, 0], [4, 0, 4, 1, 1]])
    probs = np.stack([_peaked(row) for row in predicted])
    return probs, labels


def test_token_metrics_by_hand():
    probs, labels = _token_case()
    metrics = token_classification_metrics(probs, labels, LABEL_NAMES)
    # strict IOB2: the predicted "I-LOC" without a B- opens no span, so the predicted spans are {PER} and
    # the gold spans {PER, LOC, LOC}: precision 1/1, recall 1/3, F1 2 * 1 * 1/3 / (4/3) = 0.5
    assert metrics["precision"] == pytest.approx(1.0)
    assert metrics["recall"] == pytest.approx(1 / 3)
    assert metrics["f1"] == pytest.approx(0.5)
    # 6 scored tokens, 4 right: true-class probability 0.8 on 4 of them and 0.05 on 2
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["nll"] == pytest.approx((4 * -math.log(0.8) + 2 * -math.log(0.05)) / 6)
    # Brier per right token 0.2^2 + 4 * 0.05^2 = 0.05; per wrong token 0.95^2 + 0.8^2 + 3 * 0.05^2 = 1.55
    assert metrics["brier"] == pytest.approx((4 * 0.05 + 2 * 1.55) / 6)
    # every confidence is 0.8: one bin, ECE = |4/6 - 0.8|; all tied, so AUROC 0.5 and AURC the error rate
    assert metrics["ece"] == pytest.approx(abs(4 / 6 - 0.8))
    assert metrics["auroc_error"] == pytest.approx(0.5)
    assert metrics["aurc"] == pytest.approx(2 / 6)


def test_token_metrics_accept_per_sentence_lists_and_confidences():
    probs, labels = _token_case()
    padded = token_classification_metrics(probs, labels, LABEL_NAMES)
    ragged = token_classification_metrics(
        [probs[0], torch.tensor(probs[1, :3])], [labels[0], labels[1, :3].tolist()], LABEL_NAMES
    )
    assert ragged == pytest.approx(padded, nan_ok=True)
    # confidences ranking both errors (sentence 1 position 4, sentence 2 position 2) lowest
    confidences = np.array([[0.0, 0.9, 0.9, 0.9, 0.1], [0.0, 0.9, 0.2, 0.0, 0.0]])
    with_confidences = token_classification_metrics(probs, labels, LABEL_NAMES, confidences=confidences)
    assert with_confidences["auroc_error"] == pytest.approx(1.0)
    assert with_confidences["f1"] == pytest.approx(0.5)


def test_token_metrics_reject_mismatched_label_names():
    probs, labels = _token_case()
    with pytest.raises(ValueError, match="one column per label name"):
        token_classification_metrics(probs, labels, LABEL_NAMES[:3])


def test_calibration_bins_put_confidence_one_in_the_last_bin():
    bins = calibration_bins([0.05, 1.0, 0.95], [True, False, True], n_bins=10)
    assert bins["count"].tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    assert bins["accuracy"][9] == pytest.approx(0.5)
    assert bins["confidence"][9] == pytest.approx(0.975)
    assert np.isnan(bins["accuracy"][5])


def test_reliability_pngs_are_written(tmp_path):
    rng = np.random.default_rng(0)
    confidences = rng.uniform(0.3, 1.0, size=200)
    correct = rng.uniform(size=200) < confidences
    single = save_reliability_diagram(confidences, correct, tmp_path / "one.png", title="LoRA")
    overlay = save_reliability_comparison(
        {"LoRA": (confidences, correct), "UMEMA": (np.sqrt(confidences), correct)}, tmp_path / "plots" / "all.png"
    )
    for path in (single, overlay):
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    with pytest.raises(ValueError, match="empty"):
        save_reliability_comparison({}, tmp_path / "none.png")
