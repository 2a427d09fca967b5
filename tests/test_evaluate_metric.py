"""The calibration figures as an `evaluate` metric (loaded offline by path) and `compute_metrics` for the Trainer."""

import math

import evaluate
import numpy as np
import pytest
import torch
from conftest import tiny_model
from torch.utils.data import Dataset
from transformers import EvalPrediction, Trainer, TrainingArguments

from peft_umema.evaluation import CALIBRATION_METRIC_PATH
from peft_umema.evaluation.metrics import (
    brier_score,
    classification_metrics,
    error_detection_auroc,
    expected_calibration_error,
    negative_log_likelihood,
    risk_coverage_auc,
    token_classification_metrics,
)
from peft_umema.evaluation.trainer_metrics import make_compute_metrics

CALIBRATION_KEYS = {"ece", "nll", "brier", "auroc_error", "aurc"}


def random_predictions(n=60, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    logits = 3 * rng.normal(size=(n, classes))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.where(rng.random(n) < 0.6, probs.argmax(1), rng.integers(0, classes, n))
    return logits, probs, labels


@pytest.fixture(scope="module")
def calibration():
    return evaluate.load(CALIBRATION_METRIC_PATH)


def test_the_evaluate_metric_gives_the_package_figures(calibration):
    _, probs, labels = random_predictions()
    correct = probs.argmax(1) == labels
    confidence = probs.max(1)
    assert 0 < correct.mean() < 1
    result = calibration.compute(predictions=probs, references=labels)
    assert result == {
        "ece": expected_calibration_error(confidence, correct),
        "nll": negative_log_likelihood(probs, labels),
        "brier": brier_score(probs, labels),
        "auroc_error": error_detection_auroc(confidence, correct),
        "aurc": risk_coverage_auc(confidence, correct),
    }
    # the same keys and values as the package's classification report, less its task scores
    report = classification_metrics(probs, labels)
    assert result == pytest.approx({key: report[key] for key in CALIBRATION_KEYS}, abs=1e-12)

    # another confidence score and another bin count
    scores = np.random.default_rng(1).random(len(labels))
    custom = calibration.compute(predictions=probs, references=labels, confidences=scores, n_bins=5)
    assert custom["ece"] == expected_calibration_error(scores, correct, n_bins=5)
    assert custom["auroc_error"] == error_detection_auroc(scores, correct)
    assert custom["aurc"] == risk_coverage_auc(scores, correct)
    assert custom["nll"] == result["nll"] and custom["ece"] != result["ece"]


def test_the_evaluate_metric_accumulates_batches_and_checks_its_input(calibration):
    _, probs, labels = random_predictions(seed=2)
    for start in range(0, len(labels), 16):
        calibration.add_batch(predictions=probs[start : start + 16], references=labels[start : start + 16])
    assert calibration.compute() == calibration.compute(predictions=probs, references=labels)
    logits, _, _ = random_predictions(seed=2)
    with pytest.raises(ValueError, match="apply softmax"):
        calibration.compute(predictions=logits, references=labels)
    # all right: nothing to separate, so no AUROC
    perfect = calibration.compute(predictions=[[0.8, 0.2], [0.1, 0.9]], references=[0, 1])
    assert math.isnan(perfect["auroc_error"]) and perfect["aurc"] == 0.0


MEAN_CONFIDENCE_SCRIPT = '''
import datasets
import evaluate
import numpy as np


class MeanConfidence(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="mean maximum probability", citation="", inputs_description="",
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        return {"mean_confidence": float(np.max(predictions, axis=1).mean()), "nll": -1.0}
'''


def test_the_evaluate_metric_combines_with_other_modules(calibration, tmp_path):
    script = tmp_path / "mean_confidence.py"
    script.write_text(MEAN_CONFIDENCE_SCRIPT)
    combined = evaluate.combine([calibration, evaluate.load(str(script))])
    _, probs, labels = random_predictions(seed=3)
    result = combined.compute(predictions=probs, references=labels)
    alone = calibration.compute(predictions=probs, references=labels)
    assert result["mean_confidence"] == pytest.approx(probs.max(1).mean())
    # both modules report an `nll`: evaluate keeps both, prefixed by module name
    assert sorted(key for key in result if key.endswith("nll")) == ["calibration_metrics_nll", "mean_confidence_nll"]
    assert result["calibration_metrics_nll"] == alone["nll"] and result["ece"] == alone["ece"]


def test_compute_metrics_for_sequence_tasks():
    logits, probs, labels = random_predictions(seed=4)
    compute_metrics = make_compute_metrics()
    result = compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    assert set(result) == {"accuracy", "macro_f1"} | CALIBRATION_KEYS
    assert result == pytest.approx(classification_metrics(probs, labels), abs=1e-12)
    # models with more outputs (UMEMA's confidence, ...) hand a tuple whose first entry is the logits
    extra = np.random.default_rng(0).random(len(labels))
    assert compute_metrics(EvalPrediction(predictions=(logits, extra), label_ids=labels)) == result
    with pytest.raises(ValueError, match="label_names"):
        make_compute_metrics("TOKEN_CLS")
    with pytest.raises(ValueError, match="task_type"):
        make_compute_metrics("CAUSAL_LM")


def test_compute_metrics_for_token_tasks_scores_entity_spans():
    names = ["O", "B-PER", "I-PER", "B-LOC"]

    def one_hot_logits(tags, length):
        logits = np.full((length, len(names)), -100.0)  # the Trainer pads shorter rows with -100
        for position, tag in enumerate(tags):
            logits[position] = 0.0
            logits[position, names.index(tag)] = 4.0
        return logits

    # sentence 1: the PER span found; sentence 2: the LOC span missed, and a spurious I-PER (no span in IOB2)
    predicted = np.stack([one_hot_logits(["B-PER", "I-PER", "O"], 4), one_hot_logits(["O", "I-PER"], 4)])
    gold = np.array([[1, 2, 0, -100], [3, 0, -100, -100]])
    result = make_compute_metrics("TOKEN_CLS", names)(EvalPrediction(predictions=predicted, label_ids=gold))
    assert result["precision"] == 1.0 and result["recall"] == 0.5 and result["f1"] == pytest.approx(2 / 3)
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert set(result) == {"precision", "recall", "f1", "accuracy", "entity_ece", "entity_nll"} | CALIBRATION_KEYS
    # the entity tokens (gold not O): B-PER, I-PER right, B-LOC wrong, each at confidence e^4 / (e^4 + 3)
    confidence = np.exp(4) / (np.exp(4) + 3)
    assert result["entity_ece"] == pytest.approx(confidence - 2 / 3, abs=1e-5)
    assert result["entity_nll"] == pytest.approx(-np.log(confidence) * 2 / 3 - np.log(1 / (np.exp(4) + 3)) / 3,
                                                 abs=1e-5)


class _TokenRows(Dataset):
    def __init__(self, lengths, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.rows = [
            {"input_ids": torch.randint(1, 96, (length,), generator=generator),
             "labels": torch.randint(0, 3, (length,), generator=generator)}
            for length in lengths
        ]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def pad_rows(rows):
    length = max(len(row["input_ids"]) for row in rows)
    batch = {"input_ids": torch.zeros(len(rows), length, dtype=torch.long),
             "attention_mask": torch.zeros(len(rows), length, dtype=torch.long),
             "labels": torch.full((len(rows), length), -100)}
    for index, row in enumerate(rows):
        size = len(row["input_ids"])
        batch["input_ids"][index, :size] = row["input_ids"]
        batch["attention_mask"][index, :size] = 1
        batch["labels"][index, :size] = row["labels"]
    return batch


def test_compute_metrics_in_trainer_evaluate(tmp_path):
    """Through `Trainer.evaluate` on a tiny BERT tagger, with eval batches of different lengths (the Trainer pads
    the logits of the shorter ones): the figures of the model's own per-sentence probabilities."""
    names = ["O", "B-PER", "I-PER"]
    model = tiny_model("bert", "TOKEN_CLS", num_labels=3)
    data = _TokenRows([5, 7, 9, 4, 6])
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, eval_dataset=data, data_collator=pad_rows,
                      compute_metrics=make_compute_metrics("TOKEN_CLS", names))
    result = trainer.evaluate()
    model.eval()
    with torch.no_grad():
        probs = [model(input_ids=row["input_ids"][None]).logits[0].softmax(-1).numpy() for row in data.rows]
    expected = token_classification_metrics(probs, [row["labels"].numpy() for row in data.rows], names)
    for key, value in expected.items():
        assert result[f"eval_{key}"] == pytest.approx(value, abs=1e-5), key
