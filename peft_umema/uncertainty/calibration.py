"""Calibrate UM on held-out data: its temperature and its reported confidence.

Both are learned from training examples, which the model fits better and better: cross-entropy keeps rewarding
sharper outputs (T drifts to T_min) and the confidence target "the prediction was right" is almost always 1, so UM's
confidence saturates. On the dev split, where errors happen, `calibrate_uncertainty` refits by LBFGS:

1. three scalars of T(x) = T_min + softplus(s * w.f(x) + b + gain * v(x)) on NLL: the scale s of the learned term,
   the bias b and the uncertainty gain (kept >= 0, so T still grows with uncertainty). s = 0, gain = 0 is ordinary
   temperature scaling, so the refit is at least as good on dev NLL;
2. the confidence map sigmoid(m0 logit(c_UM) + m1 logit(max calibrated prob) + m2) on the binary cross-entropy of
   "the prediction is correct". m = (0, 1, 0) is the calibrated softmax response, m = (1, 0, 0) UM's own
   confidence, so the map is at least as good as either on dev.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .estimator import _EPS, UncertaintyEstimator


@torch.no_grad()
def _collect(model, estimator: UncertaintyEstimator, dataloader):
    """Per labelled position: uncalibrated logits, temperature and its inputs, UM confidence, label."""
    states = []
    handle = estimator.register_forward_hook(lambda module, args, state: states.append(state))
    columns = {name: [] for name in ("logits", "temperature", "features", "uncertainty", "um_confidence", "labels")}
    try:
        model.eval()
        device = next(model.parameters()).device
        for batch in tqdm(dataloader, desc="collecting dev predictions", leave=False):
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            output = model(**batch)
            state = states.pop()
            features, uncertainty = estimator.temperature_inputs(state)
            um_confidence = state.token_confidence if labels.dim() == 2 else state.sequence_confidence
            valid = labels != -100
            temperature = output["temperature"]
            raw_logits = output["logits"] * temperature.unsqueeze(-1)
            for name, value in zip(columns, (raw_logits, temperature, features, uncertainty, um_confidence, labels)):
                columns[name].append(value[valid].float() if name != "labels" else value[valid])
    finally:
        handle.remove()
    return {name: torch.cat(values) for name, values in columns.items()}


def _lbfgs(parameters, loss_fn, max_iter: int) -> None:
    optimizer = torch.optim.LBFGS(parameters, lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    optimizer.step(closure)


def calibrate_uncertainty(model, dataloader, adapter_name: Optional[str] = None, max_iter: int = 100) -> dict:
    """Refit the temperature and the confidence map of the active (or named) UMEMA adapter on `dataloader`
    (batches with `labels`). Returns dev NLL and confidence BCE before and after; other weights and the memory
    bank are untouched. A refit that does not improve its dev loss is not applied."""
    estimator = model.base_model._adapter_modules(adapter_name).uncertainty
    if estimator is None:
        raise ValueError("This adapter has use_um=False: there is no UM temperature or confidence to calibrate.")
    data = _collect(model, estimator, dataloader)
    labels = data["labels"]
    if labels.numel() == 0:
        raise ValueError("The calibration data has no labelled examples.")
    report = {}

    proj = estimator.temperature_proj
    learned = (data["features"] @ proj.weight.detach().float().T).squeeze(-1)
    scale = torch.ones((), requires_grad=True)
    bias = proj.bias.detach().float().clone().squeeze().requires_grad_(True)
    gain = estimator.uncertainty_gain.detach().float().clone().requires_grad_(True)

    def temperature():
        return estimator.min_temperature + F.softplus(scale * learned + bias + F.softplus(gain) * data["uncertainty"])

    def nll():
        return F.cross_entropy(data["logits"] / temperature().unsqueeze(-1), labels)

    report["dev_nll_before"] = nll().item()
    _lbfgs([scale, bias, gain], nll, max_iter)
    report["dev_nll_after"] = nll().item()
    report["temperature_refit"] = math.isfinite(report["dev_nll_after"]) and report["dev_nll_after"] < report[
        "dev_nll_before"
    ]
    if report["temperature_refit"]:
        with torch.no_grad():
            proj.weight.mul_(scale.to(proj.weight))
            proj.bias.fill_(bias.item())
            estimator.uncertainty_gain.fill_(gain.item())
    else:
        report["dev_nll_after"] = report["dev_nll_before"]

    with torch.no_grad():
        final_temperature = temperature() if report["temperature_refit"] else data["temperature"]
        probs = torch.softmax(data["logits"] / final_temperature.unsqueeze(-1), -1)
        correct = (probs.argmax(-1) == labels).float()
        inputs = torch.stack(
            [torch.logit(data["um_confidence"], eps=_EPS), torch.logit(probs.amax(-1), eps=_EPS)], -1
        )
    weights = estimator.confidence_map.detach().float().clone().requires_grad_(True)

    def confidence_bce():
        return F.binary_cross_entropy_with_logits(inputs @ weights[:2] + weights[2], correct)

    report["dev_confidence_bce_before"] = confidence_bce().item()
    if 0 < float(correct.mean()) < 1:  # needs both right and wrong predictions to learn from
        _lbfgs([weights], confidence_bce, max_iter)
    report["dev_confidence_bce_after"] = confidence_bce().item()
    report["confidence_refit"] = report["dev_confidence_bce_after"] < report["dev_confidence_bce_before"]
    if report["confidence_refit"]:
        estimator.confidence_map.copy_(weights.detach().to(estimator.confidence_map))
    else:
        report["dev_confidence_bce_after"] = report["dev_confidence_bce_before"]
    return report
