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
    assert result["temperature_fit"] != "identity" and result["dev_nll_after"] < result["dev_nll_before"]
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
    assert result["confidence_fit"] in ("um", "softmax", "stacked")
    estimator = model.base_model.umema_modules["default"].uncertainty
    model.eval()
    outputs = [model(**b) for b in dev]
    labels = torch.cat([b["labels"] for b in dev])
    logits = torch.cat([o.logits for o in outputs]).detach()
    confidence = torch.cat([o.confidence for o in outputs]).detach()
    correct = (logits.argmax(-1) == labels).numpy()
    if result["confidence_fit"] == "softmax":
        assert torch.equal(estimator.confidence_map, torch.tensor([0.0, 1.0, 0.0]))
    assert ((confidence > 0) & (confidence < 1)).all()
    softmax_auroc = error_detection_auroc(torch.softmax(logits, -1).amax(-1).numpy(), correct)
    assert error_detection_auroc(confidence.numpy(), correct) >= softmax_auroc - 0.05


@pytest.mark.parametrize("task", ["SEQ_CLS", "TOKEN_CLS"])
def test_the_dev_fit_uses_the_novelty_when_errors_sit_on_unfamiliar_inputs(task):
    """Dev data whose wrong predictions are exactly the inputs that are not among the novelty references: the raw
    softmax cannot tell them apart (same kind of input), the memory's novelty can, and the fit must carry it into the
    reported confidence, through the temperature (T grows with novelty) or the confidence stack."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("bert", task), UMEMAConfig(task_type=task, r=4, memory_size=8)).eval()
    familiar = [tiny_batch(task=task, seed=s, batch_size=8) for s in range(4)]
    unfamiliar = [tiny_batch(task=task, seed=s, batch_size=8) for s in range(10, 14)]  # same kind, not referenced
    model.base_model.refresh_novelty_references([{k: v for k, v in b.items() if k != "labels"} for b in familiar])
    dev = familiar + unfamiliar

    def scored():
        with torch.no_grad():
            outputs = [model(**{k: v for k, v in b.items() if k != "labels"}) for b in dev]
        valid = torch.cat([(b["labels"] != -100).flatten() for b in dev])
        softmax = torch.cat([torch.softmax(o.logits, -1).amax(-1).flatten() for o in outputs])[valid]
        confidence = torch.cat([o.confidence.flatten() for o in outputs])[valid]
        return outputs, valid, softmax, confidence

    outputs, valid, raw_softmax, _ = scored()
    for batch, output, shift in zip(dev, outputs, [0] * len(familiar) + [1] * len(unfamiliar)):
        # right on the referenced inputs, wrong on the others
        batch["labels"] = torch.where(batch["labels"] == -100, -100, (output.logits.argmax(-1) + shift) % 3)
    correct = torch.cat([(o.logits.argmax(-1) == b["labels"]).flatten() for o, b in zip(outputs, dev)])[valid]
    assert error_detection_auroc(raw_softmax.numpy(), correct.numpy()) < 0.8
    result = calibrate_uncertainty(model, dev)
    assert result["temperature_fit"] == "parameterised" or result["confidence_weights"]["novelty"] < 0
    _, _, _, confidence = scored()
    assert error_detection_auroc(confidence.numpy(), correct.numpy()) > 0.95


def _dev_nll(model, dev):
    model.eval()
    with torch.no_grad():
        logits = [model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in dev]
    labels = torch.cat([b["labels"].reshape(-1) for b in dev])
    logits = torch.cat([x.reshape(-1, x.shape[-1]) for x in logits])
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100).item()


def _temperature_scaling_nll(model, dev):
    """Dev NLL of LoRA + one temperature fitted on dev, on the raw (uncalibrated) logits of the same model."""
    from peft_umema.baselines.temperature import fit_temperature

    model.eval()
    raw, labels = [], []
    with torch.no_grad(), model.base_model.recording_calls() as calls:
        for b in dev:
            model(**{k: v for k, v in b.items() if k != "labels"})
    for call, b in zip(calls, dev):
        valid = b["labels"] != -100
        raw.append(call.raw_logits[valid])
        labels.append(b["labels"][valid])
    raw, labels = torch.cat(raw), torch.cat(labels)
    temperature = fit_temperature(raw, labels)
    return torch.nn.functional.cross_entropy(raw / temperature, labels).item()


@pytest.mark.parametrize("family,task", [("gpt2", "SEQ_CLS"), ("bert", "TOKEN_CLS"), ("llama", "SEQ_CLS"),
                                         ("bert", "SEQ_CLS")])
@pytest.mark.parametrize("scale", [0.2, 30.0])  # under- and overconfident
def test_the_fit_is_never_worse_than_temperature_scaling_on_its_split(family, task, scale):
    torch.manual_seed(0)
    model = get_peft_model(tiny_model(family, task), UMEMAConfig(task_type=task, r=4, memory_size=8))
    head = model.base_model.model.get_submodule("score" if family != "bert" else "classifier")
    with torch.no_grad():
        for p in head.parameters():
            p.mul_(scale)
    dev = [tiny_batch(task=task, seed=s, batch_size=8) for s in range(6)]
    result = calibrate_uncertainty(model, dev)
    assert result["temperature_fit"] in ("constant", "parameterised", "identity")
    assert _dev_nll(model, dev) <= _temperature_scaling_nll(model, dev) + 1e-4


@pytest.mark.parametrize("mode", ["detached", "joint"])
def test_training_moves_the_temperature_only_when_joint(mode):
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("bert"), UMEMAConfig(task_type="SEQ_CLS", r=4, memory_size=8,
                                                          temperature_training=mode))
    estimator = model.base_model.umema_modules["default"].uncertainty
    before = estimator.temperature_proj.bias.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for seed in range(3):
        model(**tiny_batch(seed=seed)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.base_model.commit_memory()
    moved = not torch.equal(before, estimator.temperature_proj.bias.detach())
    assert moved == (mode == "joint")


@pytest.mark.parametrize("family,task", [("gpt2", "SEQ_CLS"), ("bert", "TOKEN_CLS")])
def test_logit_scale_multiplies_the_logits_before_the_temperature(family, task):
    outputs = {}
    for scale in (1.0, 2.0):
        torch.manual_seed(0)
        model = get_peft_model(tiny_model(family, task), UMEMAConfig(task_type=task, r=4, memory_size=8,
                                                                    logit_scale=scale)).eval()
        outputs[scale] = model(**tiny_batch(task=task, seed=0))
    assert torch.equal(outputs[1.0].temperature, outputs[2.0].temperature)
    assert torch.allclose(outputs[2.0].logits, 2 * outputs[1.0].logits, atol=1e-5)


def test_a_fitted_calibration_survives_save_and_load(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    model = get_peft_model(tiny_model("bert"), UMEMAConfig(task_type="SEQ_CLS", r=4, memory_size=8))
    head = model.base_model.model.get_submodule("classifier")
    with torch.no_grad():
        for p in head.parameters():
            p.mul_(30.0)
    dev = [tiny_batch(seed=s, batch_size=8) for s in range(4)]
    result = calibrate_uncertainty(model, dev)
    assert result["temperature_fit"] != "identity"
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(tiny_model("bert"), tmp_path).eval()
    model.eval()
    batch = {k: v for k, v in dev[0].items() if k != "labels"}
    with torch.no_grad():
        expected, actual = model(**batch), loaded(**batch)
    assert loaded.base_model.umema_modules["default"].uncertainty.calibrator.is_fitted
    for name in ("logits", "temperature", "confidence"):
        torch.testing.assert_close(actual[name], expected[name])


def _collected(examples: int, temperature_from_feature: bool, seed: int = 0) -> dict:
    """Collected dev rows (as `_collect` returns them) of a 5-class model whose true temperature is 0.5 + 6 * (the
    aleatoric feature) when `temperature_from_feature`, and 1.5 for every example otherwise."""
    from peft_umema.uncertainty.calibrator import LOGIT_FEATURES, UNCERTAINTY_FEATURES

    generator = torch.Generator().manual_seed(seed)
    memory_dim = 8
    logits = 4 * torch.randn(examples, 5, generator=generator, dtype=torch.float64)
    features = torch.randn(examples, memory_dim + len(UNCERTAINTY_FEATURES) + len(LOGIT_FEATURES),
                           generator=generator, dtype=torch.float64)
    features[:, memory_dim] = torch.rand(examples, generator=generator, dtype=torch.float64)  # aleatoric in [0, 1]
    temperature = 0.5 + 6 * features[:, memory_dim] if temperature_from_feature else torch.full((examples,), 1.5)
    labels = torch.multinomial(torch.softmax(logits / temperature.unsqueeze(-1), -1), 1, generator=generator)[:, 0]
    return {"raw_logits": logits, "um_temperature": torch.ones(examples, dtype=torch.float64), "features": features,
            "labels": labels, "group": torch.arange(examples)}, memory_dim


@pytest.mark.parametrize("temperature_from_feature", [False, True])
def test_the_parameterised_temperature_is_kept_only_when_clearly_better(temperature_from_feature):
    """One constant T generates the labels: temperature scaling is kept (the free features only fit noise). T grows
    with the aleatoric feature: the parameterised form wins the held-out check by a clear margin and is kept."""
    from types import SimpleNamespace

    from peft_umema.uncertainty import calibration
    from peft_umema.uncertainty.calibrator import TemperatureCalibrator

    data, memory_dim = _collected(600, temperature_from_feature)
    report = calibration._fit_temperature(SimpleNamespace(calibrator=TemperatureCalibrator(memory_dim).double()), data)
    assert report["temperature_fit"] == ("parameterised" if temperature_from_feature else "constant")
    assert report["dev_nll_after"] <= report["dev_nll_constant"] + 1e-9


@pytest.mark.parametrize("novelty_informs", [False, True])
def test_the_confidence_stack_takes_the_novelty_only_when_it_tells_errors(novelty_informs):
    """Rows with one temperature (T = 1 fitted) whose errors either follow the novelty feature or do not: the
    confidence fit weighs the novelty (negatively: unusual inputs are wrong more often) only in the first case, and
    its reported confidence then ranks the errors better than the softmax."""
    from types import SimpleNamespace

    from peft_umema.evaluation.metrics import error_detection_auroc
    from peft_umema.uncertainty import calibration
    from peft_umema.uncertainty.calibrator import UNCERTAINTY_FEATURES

    data, memory_dim = _collected(800, temperature_from_feature=False)
    generator = torch.Generator().manual_seed(1)
    novelty = torch.rand(len(data["labels"]), generator=generator, dtype=torch.float64)
    data["features"][:, memory_dim + UNCERTAINTY_FEATURES.index("novelty")] = novelty
    predicted = data["raw_logits"].argmax(-1)
    wrong = torch.rand(len(novelty), generator=generator, dtype=torch.float64) < (novelty if novelty_informs else 0.5)
    data["labels"] = torch.where(wrong, (predicted + 1) % 5, predicted)
    data["um_confidence"] = torch.full_like(novelty, 0.5)
    data["temperature"] = torch.ones_like(novelty)
    estimator = SimpleNamespace(calibrator=SimpleNamespace(memory_dim=memory_dim),
                                confidence_map=torch.tensor([1.0, 0.0, 0.0]),
                                confidence_novelty_weight=torch.zeros(1))
    report = calibration._fit_confidence(estimator, data)
    if novelty_informs:
        assert report["confidence_fit"] == "stacked" and report["confidence_weights"]["novelty"] < -1
        probs = torch.softmax(data["raw_logits"], -1).amax(-1)
        stacked = torch.sigmoid(estimator.confidence_map[1] * torch.logit(probs) + estimator.confidence_map[2]
                                + estimator.confidence_novelty_weight * novelty)
        correct = (~wrong).numpy()
        assert error_detection_auroc(stacked.numpy(), correct) > error_detection_auroc(probs.numpy(), correct) + 0.1
    else:
        assert abs(report["confidence_weights"]["novelty"]) < 1


def test_an_adapter_saved_before_the_logit_scale_and_novelty_weight_loads_as_it_was_trained(tmp_path):
    import json

    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = get_peft_model(tiny_model("bert"), UMEMAConfig(task_type="SEQ_CLS", r=4, memory_size=8, logit_scale=1.0))
    model.eval()
    batch = {k: v for k, v in tiny_batch().items() if k != "labels"}
    expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    config_path, weights_path = tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors"
    config = json.loads(config_path.read_text())
    del config["logit_scale"]  # as written before the field existed
    config_path.write_text(json.dumps(config))
    weights = {k: v for k, v in load_file(weights_path).items() if "confidence_novelty_weight" not in k}
    save_file(weights, weights_path, metadata={"format": "pt"})
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(tiny_model("bert"), tmp_path).eval()
    assert loaded.peft_config["default"].logit_scale == 1.0
    torch.testing.assert_close(loaded(**batch).logits, expected)
