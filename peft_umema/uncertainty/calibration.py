"""Refit UM's temperature head on held-out data.

Trained jointly with the classifier, the temperature sees only training examples, which the model fits better
and better, so cross-entropy keeps rewarding sharper outputs (T drifts to T_min). After training we refit three
scalars of T(x) = T_min + softplus(s * w.f(x) + b + gain * v(x)) on the dev split by LBFGS on NLL: the scale s of
the learned term, the bias b and the uncertainty gain (kept >= 0, so T still grows with uncertainty). With s = 0
and gain = 0 this is ordinary temperature scaling, so the refit can only match or beat it on dev NLL.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .estimator import UncertaintyEstimator


@torch.no_grad()
def _collect(model, estimator: UncertaintyEstimator, dataloader):
    """Uncalibrated logits, temperature features and labels of the positions that carry a label."""
    states = []
    handle = estimator.register_forward_hook(lambda module, args, state: states.append(state))
    logits, features, uncertainty, labels = [], [], [], []
    try:
        model.eval()
        device = next(model.parameters()).device
        for batch in tqdm(dataloader, desc="collecting dev predictions", leave=False):
            batch = {k: v.to(device) for k, v in batch.items()}
            target = batch.pop("labels")
            output = model(**batch)
            feature, total = estimator.temperature_inputs(states.pop())
            temperature = output["temperature"]
            raw = output["logits"] * temperature.unsqueeze(-1)
            valid = target != -100
            logits.append(raw[valid].float())
            features.append(feature[valid].float())
            uncertainty.append(total[valid].float())
            labels.append(target[valid])
    finally:
        handle.remove()
    return torch.cat(logits), torch.cat(features), torch.cat(uncertainty), torch.cat(labels)


def fit_uncertainty_temperature(model, dataloader, adapter_name: Optional[str] = None, max_iter: int = 100) -> dict:
    """Refit the temperature of the active (or named) UMEMA adapter on `dataloader` (batches with `labels`).

    Returns the dev NLL before and after. The model's other weights and the memory bank are untouched.
    """
    tuner = model.base_model
    estimator = tuner._adapter_modules(adapter_name).uncertainty
    if estimator is None:
        raise ValueError("This adapter has use_um=False: there is no UM temperature to calibrate.")
    logits, features, uncertainty, labels = _collect(model, estimator, dataloader)
    if labels.numel() == 0:
        raise ValueError("The calibration data has no labelled examples.")
    proj = estimator.temperature_proj
    learned = (features @ proj.weight.detach().float().T).squeeze(-1)
    scale = torch.ones((), requires_grad=True)
    bias = proj.bias.detach().float().clone().squeeze().requires_grad_(True)
    gain = estimator.uncertainty_gain.detach().float().clone().requires_grad_(True)

    def nll():
        temperature = estimator.min_temperature + F.softplus(scale * learned + bias + F.softplus(gain) * uncertainty)
        return F.cross_entropy(logits / temperature.unsqueeze(-1), labels)

    before = float(nll())
    optimizer = torch.optim.LBFGS([scale, bias, gain], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = nll()
        loss.backward()
        return loss

    optimizer.step(closure)
    after = float(nll())
    if not math.isfinite(after) or after > before:
        return {"dev_nll_before": before, "dev_nll_after": before, "refit": False}
    with torch.no_grad():
        proj.weight.mul_(scale.to(proj.weight))
        proj.bias.fill_(float(bias))
        estimator.uncertainty_gain.fill_(float(gain))
    return {"dev_nll_before": before, "dev_nll_after": after, "refit": True}
