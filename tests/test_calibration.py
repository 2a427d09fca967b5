"""Refitting UM's temperature on held-out data."""

import pytest
import torch
from conftest import tiny_batch, tiny_model
from peft import get_peft_model

from peft_umema import UMEMAConfig
from peft_umema.evaluation.metrics import error_detection_auroc
from peft_umema.uncertainty.calibration import calibrate_uncertainty


@pytest.mark.parametrize("family,task", [("gpt2", "SEQ_CLS"), ("bert", "TOKEN_CLS"), ("llama", "SEQ_CLS")])
def test_refit_lowers_dev_nll_of_an_overconfident_model(family, task):
    torch.manual_seed(0)
    model = get_peft_model(tiny_model(family, task), UMEMAConfig(task_type=task, r=4, memory_size=8))
    head = model.base_model.model.get_submodule("score" if family != "bert" else "classifier")
    with torch.no_grad():
        for p in head.parameters():
            p.mul_(30.0)  # random labels + huge logits = badly overconfident
    dev = [tiny_batch(task=task, seed=s, batch_size=8) for s in range(4)]
    bank = model.base_model.umema_modules["default"].memory.bank.keys.clone()
    model.eval()
    before = torch.stack([model(**b).temperature.mean() for b in dev]).mean()
    result = calibrate_uncertainty(model, dev)
    after = torch.stack([model(**b).temperature.mean() for b in dev]).mean()
    assert result["temperature_refit"] and result["dev_nll_after"] < result["dev_nll_before"]
    assert after > before  # flatter: the fix for overconfidence
    nll = sum(float(model(**b).loss.detach()) for b in dev) / len(dev)
    assert nll < result["dev_nll_before"]
    assert torch.equal(bank, model.base_model.umema_modules["default"].memory.bank.keys)


def test_refit_needs_um():
    model = get_peft_model(tiny_model("gpt2"), UMEMAConfig(task_type="SEQ_CLS", use_um=False))
    with pytest.raises(ValueError, match="use_um=False"):
        calibrate_uncertainty(model, [tiny_batch()])


def test_confidence_refit_ranks_errors_at_least_as_well_as_softmax_response():
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("bert"), UMEMAConfig(task_type="SEQ_CLS", r=4, memory_size=8))
    dev = [tiny_batch(seed=s, batch_size=16) for s in range(6)]
    result = calibrate_uncertainty(model, dev)
    assert result["dev_confidence_bce_after"] <= result["dev_confidence_bce_before"]
    estimator = model.base_model.umema_modules["default"].uncertainty
    model.eval()
    outputs = [model(**b) for b in dev]
    labels = torch.cat([b["labels"] for b in dev])
    logits = torch.cat([o.logits for o in outputs]).detach()
    confidence = torch.cat([o.confidence for o in outputs]).detach()
    correct = (logits.argmax(-1) == labels).numpy()
    if result["confidence_refit"]:
        assert not torch.equal(estimator.confidence_map, torch.tensor([1.0, 0.0, 0.0]))
    assert ((confidence > 0) & (confidence < 1)).all()
    softmax_auroc = error_detection_auroc(torch.softmax(logits, -1).amax(-1).numpy(), correct)
    assert error_detection_auroc(confidence.numpy(), correct) >= softmax_auroc - 0.05
