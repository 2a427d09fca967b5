"""Fit UM's reported temperature and confidence on held-out data (the dev split).

Training data cannot teach either: cross-entropy keeps rewarding sharper outputs and the confidence target "the
prediction was right" is almost always 1 there. On dev, where errors happen, `calibrate_uncertainty` fits

1. the temperature (calibrator.py): three candidates, (a) UM's own T_UM, (b) temperature scaling (one constant T),
   (c) parameterised temperature scaling from UM's features (M_U, aleatoric, epistemic, memory novelty, logit gap and
   entropy), started at (b). Each is scored by a two-fold check on dev (fit on one half, NLL on the other); (b) is
   kept unless (a) or (c) beats it there by `SELECTION_MARGIN` standard errors, and the choice is refitted on the
   whole split;
2. the reported confidence sigmoid(m0 logit(c_UM) + m1 logit(max calibrated prob) + m2) on the binary
   cross-entropy of "the prediction is right": UM's own (1, 0, 0), the calibrated softmax response (0, 1, 0), or the
   fitted stack; the two-fold check keeps the one with the lowest held-out cross-entropy among those that rank errors
   (AUROC) at least as well as the softmax response.

Other weights and the memory bank are untouched.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..constants import IGNORE_INDEX
from .calibrator import TEMPERATURE_RANGE, UNCERTAINTY_FEATURES
from .estimator import _EPS

FOLDS = 2
# A form other than temperature scaling is kept only if it beats it on held-out folds by this many standard errors
# of the per-example NLL difference: on a few hundred dev examples a small held-out gain is noise (measured: the
# parameterised form won the two-fold check on WNUT-17 and lost to temperature scaling on its test set).
SELECTION_MARGIN = 2.0
L2_PENALTY = 1e-2  # on the standardised feature weights of the parameterised fit
MEMORY_COMPONENTS = 4  # principal directions of M_U the parameterised fit may use
MAX_ITER = 100


@torch.no_grad()
def _collect(model, tuner, adapter: str, dataloader) -> dict[str, torch.Tensor]:
    """Per labelled position: raw logits, T_UM, calibration features, UM confidence, label, example index."""
    calibrator = tuner.umema_modules[adapter].uncertainty.calibrator
    fitted = calibrator.is_fitted
    calibrator.mark_fitted(False)  # read T_UM itself
    columns = {name: [] for name in ("raw_logits", "um_temperature", "features", "um_confidence", "labels", "group")}
    from ..tuner.forward import calibration_features

    examples = 0
    try:
        model.eval()
        device = next(model.parameters()).device
        for batch in tqdm(dataloader, desc="collecting dev predictions", leave=False):
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            with tuner.recording_calls() as calls:
                model(**batch)
            call = calls[-1]
            state = call.uncertainty
            valid = labels != IGNORE_INDEX
            group = torch.arange(examples, examples + labels.shape[0], device=device)
            examples += labels.shape[0]
            if labels.dim() == 2:
                group = group.unsqueeze(1).expand_as(labels)
            um_confidence = state.token_confidence if labels.dim() == 2 else state.sequence_confidence
            values = (call.raw_logits, call.um_temperature, calibration_features(call), um_confidence, labels, group)
            for name, value in zip(columns, values):
                columns[name].append(value[valid].float() if name not in ("labels", "group") else value[valid])
    finally:
        calibrator.mark_fitted(fitted)
    # float64: LBFGS's line search on a few hundred rows stays well behaved
    return {name: torch.cat(values).cpu().double() if name not in ("labels", "group") else torch.cat(values).cpu()
            for name, values in columns.items()}


def _lbfgs(parameters, loss_fn) -> None:
    optimizer = torch.optim.LBFGS(parameters, lr=0.5, max_iter=MAX_ITER, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    optimizer.step(closure)


class _TemperatureFit:
    """Fits one candidate form of log T on the rows `index` of the collected data."""

    def __init__(self, data: dict, memory_dim: int):
        self.data = data
        self.memory_dim = memory_dim
        self.num_uncertainty = len(UNCERTAINTY_FEATURES)

    def _split_weights(self, weights):
        m, u = self.memory_dim, self.num_uncertainty
        return weights[:m], weights[m:m + u], weights[m + u:]

    def log_temperature(self, params: dict, index) -> torch.Tensor:
        features = (self.data["features"][index] - params["mean"]) / params["std"]
        memory_w, uncertainty_raw, logit_w = self._split_weights(params["weights"])
        weights = torch.cat([memory_w, F.softplus(uncertainty_raw), logit_w])  # u >= 0: T grows with uncertainty
        log_t = params["bias"] + params["um_weight"] * torch.log(self.data["um_temperature"][index]) + features @ weights
        return log_t.clamp(*(math.log(bound) for bound in TEMPERATURE_RANGE))

    def nll(self, params: dict, index, reduction: str = "mean") -> torch.Tensor:
        logits = self.data["raw_logits"][index] / self.log_temperature(params, index).exp().unsqueeze(-1)
        return F.cross_entropy(logits, self.data["labels"][index], reduction=reduction)

    def fit(self, form: str, index) -> dict:
        features = self.data["features"][index]
        num_features = features.shape[1]
        params = {
            "bias": torch.zeros((), dtype=torch.float64), "um_weight": torch.zeros((), dtype=torch.float64),
            "weights": torch.cat([torch.zeros(self.memory_dim), torch.full((self.num_uncertainty,), -8.0),
                                  torch.zeros(num_features - self.memory_dim - self.num_uncertainty)]).double(),
            "mean": features.mean(0), "std": features.std(0).clamp_min(1e-4) if len(index) > 1 else
            torch.ones(num_features, dtype=torch.float64),
        }
        if form == "identity":
            params["um_weight"] = torch.ones((), dtype=torch.float64)
            return params
        bias = params["bias"].clone().requires_grad_(True)
        _lbfgs([bias], lambda: self.nll({**params, "bias": bias}, index))
        params["bias"] = bias.detach()
        if form == "constant":
            return params
        # M_U enters through its top principal directions on the fitting rows only: 64 free weights over-fit a dev
        # split of a few hundred examples (measured on BBC News: held-out NLL 0.54-0.84 against 0.14 for one T)
        standardised = (features - params["mean"]) / params["std"]
        memory = standardised[:, : self.memory_dim]
        basis = torch.linalg.svd(memory - memory.mean(0), full_matrices=False)[2][:MEMORY_COMPONENTS].T
        trained = {
            "bias": params["bias"].clone().requires_grad_(True),
            "um_weight": params["um_weight"].clone().requires_grad_(True),
            "memory": torch.zeros(basis.shape[1], dtype=torch.float64, requires_grad=True),
            "rest": params["weights"][self.memory_dim:].clone().requires_grad_(True),
        }

        def assembled():
            weights = torch.cat([basis @ trained["memory"], trained["rest"]])
            return {**params, "bias": trained["bias"], "um_weight": trained["um_weight"], "weights": weights}

        def loss():
            _, uncertainty_raw, logit_w = self._split_weights(assembled()["weights"])
            penalty = trained["memory"].square().sum() + F.softplus(uncertainty_raw).square().sum() + \
                logit_w.square().sum()
            return self.nll(assembled(), index) + L2_PENALTY * penalty

        _lbfgs(list(trained.values()), loss)
        fitted = {name: value.detach() for name, value in assembled().items()}
        if not torch.isfinite(self.nll(fitted, index)):
            return params  # the constant fit
        return fitted

    def effective(self, params: dict) -> dict:
        memory_w, uncertainty_raw, logit_w = self._split_weights(params["weights"])
        return {**params, "weights": torch.cat([memory_w, F.softplus(uncertainty_raw), logit_w])}


def _folds(groups: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two folds by example (tokens of one sentence stay together)."""
    fold_of = groups % FOLDS
    return [(torch.nonzero(fold_of != k).squeeze(1), torch.nonzero(fold_of == k).squeeze(1)) for k in range(FOLDS)]


def _held_out(score_fn, groups: torch.Tensor) -> Optional[float]:
    folds = _folds(groups)
    if any(len(train) < 2 or len(test) < 1 for train, test in folds):
        return None
    return float(sum(score_fn(train, test) * len(test) for train, test in folds) / len(groups))


def _held_out_losses(fit: _TemperatureFit, form: str, groups: torch.Tensor) -> Optional[torch.Tensor]:
    """Per position: the NLL under `form` fitted on the other fold (None when a fold is too small to fit)."""
    folds = _folds(groups)
    if any(len(train) < 2 or len(test) < 1 for train, test in folds):
        return None
    losses = torch.empty(len(groups), dtype=torch.float64)
    for train, test in folds:
        losses[test] = fit.nll(fit.fit(form, train), test, reduction="none").detach()
    return losses


def _clearly_lower(losses: torch.Tensor, reference: torch.Tensor, groups: torch.Tensor) -> bool:
    """Whether `losses` beat `reference` by more than SELECTION_MARGIN standard errors of the paired difference,
    taken per example (the tokens of a sentence are not independent)."""
    _, example = torch.unique(groups, return_inverse=True)
    count = int(example.max()) + 1
    sizes = torch.zeros(count, dtype=torch.float64).index_add_(0, example, torch.ones_like(losses))
    difference = torch.zeros(count, dtype=torch.float64).index_add_(0, example, losses - reference) / sizes
    if count < 2:
        return False
    return bool(difference.mean() + SELECTION_MARGIN * difference.std() / math.sqrt(count) < 0)


def _fit_temperature(estimator, data: dict) -> dict:
    fit = _TemperatureFit(data, estimator.calibrator.memory_dim)
    everything = torch.arange(len(data["labels"]))
    losses = {form: _held_out_losses(fit, form, data["group"]) for form in ("identity", "constant", "parameterised")}
    report = {f"dev_nll_{form}_held_out": None if value is None else float(value.mean())
              for form, value in losses.items()}
    chosen = "constant"  # temperature scaling, unless another form is clearly better on held-out folds
    if all(value is not None for value in losses.values()):
        better = [form for form in ("identity", "parameterised")
                  if _clearly_lower(losses[form], losses["constant"], data["group"])]
        if better:
            chosen = min(better, key=lambda form: float(losses[form].mean()))
    report["dev_nll_before"] = float(fit.nll(fit.fit("identity", everything), everything))
    report["dev_nll_constant"] = float(fit.nll(fit.fit("constant", everything), everything))
    if chosen == "identity" and report["dev_nll_before"] > report["dev_nll_constant"]:
        chosen = "constant"  # never worse than temperature scaling on the split it is fitted on
    params = fit.fit(chosen, everything)
    report["dev_nll_after"] = float(fit.nll(params, everything))
    report["temperature_fit"] = chosen
    calibrator = estimator.calibrator
    with torch.no_grad():
        if chosen == "identity":
            calibrator.reset()
        else:
            effective = fit.effective(params)
            calibrator.bias.fill_(float(effective["bias"]))
            calibrator.um_weight.fill_(float(effective["um_weight"]))
            calibrator.weights.copy_(effective["weights"])
            calibrator.feature_mean.copy_(effective["mean"])
            calibrator.feature_std.copy_(effective["std"])
            calibrator.mark_fitted(True)
    data["temperature"] = fit.log_temperature(params, everything).exp()
    return report


def _auroc(confidence: torch.Tensor, correct: torch.Tensor) -> float:
    from ..evaluation.metrics import error_detection_auroc

    value = error_detection_auroc(confidence.numpy(), correct.numpy().astype(bool))
    return -1.0 if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _fit_confidence(estimator, data: dict) -> dict:
    """Choose the reported confidence among UM's own, the calibrated softmax response and a stack of both with the
    memory's novelty (how unlike the training references the input is: wrong predictions are more often on unusual
    inputs), by held-out cross-entropy among the forms that detect errors at least as well as the softmax."""
    probs = torch.softmax(data["raw_logits"] / data["temperature"].unsqueeze(-1), -1)
    correct = (probs.argmax(-1) == data["labels"]).double()
    novelty = data["features"][:, estimator.calibrator.memory_dim + UNCERTAINTY_FEATURES.index("novelty")]
    # weights: (m0 on logit c_UM, m1 on logit max prob, bias m2, m_n on novelty)
    inputs = torch.stack([torch.logit(data["um_confidence"], eps=_EPS), torch.logit(probs.amax(-1), eps=_EPS),
                          torch.ones_like(novelty), novelty], -1)
    candidates = {"um": torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64),
                  "softmax": torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)}

    def confidence(weights, index):
        return torch.sigmoid(inputs[index] @ weights)

    def bce(weights, index):
        return float(F.binary_cross_entropy(confidence(weights, index).clamp(_EPS, 1 - _EPS), correct[index]))

    def stacked(index):
        start = min(candidates.values(), key=lambda weights: bce(weights, index)).clone().requires_grad_(True)
        _lbfgs([start], lambda: F.binary_cross_entropy_with_logits(inputs[index] @ start, correct[index]))
        return start.detach()

    current = torch.cat([estimator.confidence_map.detach().double(),
                         estimator.confidence_novelty_weight.detach().double()])
    report = {"dev_confidence_bce_before": bce(current, slice(None))}
    if not 0 < float(correct.mean()) < 1:  # needs both right and wrong predictions to learn from
        report.update(dev_confidence_bce_after=report["dev_confidence_bce_before"], confidence_fit="unchanged")
        return report
    fits = {**{name: (lambda index, w=w: w) for name, w in candidates.items()}, "stacked": stacked}
    held_out = {}
    for name, fit in fits.items():
        bce_value = _held_out(lambda train, test, fit=fit: bce(fit(train), test), data["group"])
        auroc_value = _held_out(lambda train, test, fit=fit: _auroc(confidence(fit(train), test), correct[test]),
                                data["group"])
        held_out[name] = (bce_value, auroc_value)
        report[f"dev_confidence_bce_{name}_held_out"] = bce_value
        report[f"dev_confidence_auroc_{name}_held_out"] = auroc_value
    if any(value is None for pair in held_out.values() for value in pair):
        chosen = "softmax"
    else:
        floor = held_out["softmax"][1]
        eligible = [name for name, (_, auroc_value) in held_out.items() if auroc_value >= floor - 1e-9]
        chosen = min(eligible, key=lambda name: held_out[name][0])
    weights = fits[chosen](torch.arange(len(correct)))
    estimator.confidence_map.copy_(weights[:3].to(estimator.confidence_map))
    estimator.confidence_novelty_weight.copy_(weights[3:].to(estimator.confidence_novelty_weight))
    report["confidence_weights"] = {"um": float(weights[0]), "softmax": float(weights[1]), "bias": float(weights[2]),
                                    "novelty": float(weights[3])}
    report["dev_confidence_bce_after"] = bce(weights, slice(None))
    report["confidence_fit"] = chosen
    return report


def calibrate_uncertainty(model, dataloader, adapter_name: Optional[str] = None) -> dict:
    """Fit the reported temperature and confidence of the active (or named) UMEMA adapter on `dataloader`
    (batches with `labels`, e.g. the dev split). Returns the held-out scores of every candidate and what was chosen
    (`temperature_fit`: identity / constant / parameterised; `confidence_fit`: um / softmax / stacked)."""
    tuner = model.base_model
    adapter = adapter_name or tuner._single_active_adapter()
    estimator = tuner._adapter_modules(adapter).uncertainty
    if estimator is None:
        raise ValueError("This adapter has use_um=False: there is no UM temperature or confidence to calibrate.")
    if adapter not in tuner.active_adapters:
        raise ValueError(f"Adapter {adapter!r} is not active; call set_adapter({adapter!r}) first.")
    data = _collect(model, tuner, adapter, dataloader)
    if data["labels"].numel() == 0:
        raise ValueError("The calibration data has no labelled examples.")
    report = {"calibration_examples": int(np.unique(data["group"].numpy()).size),
              "calibration_positions": int(data["labels"].numel())}
    report.update(_fit_temperature(estimator, data))
    report.update(_fit_confidence(estimator, data))
    return report
