"""The temperature UM reports after a held-out fit: parameterised temperature scaling from UM's own features.

Training cannot fit a temperature: cross-entropy on training data rewards ever sharper outputs (with the temperature
in the loop it collapses to T_min). So UM's temperature is fitted where errors happen, on the dev split
(`calibrate_uncertainty`), as

    log T(x) = b + c * log T_UM(x) + w . z(M_U(x)) + u . z(aleatoric, epistemic, novelty) + a . z(gap, entropy)

z = features standardised on the fitting split; w lies in the span of M_U's top 4 principal directions there; u >= 0, so T still grows with UM's uncertainty and with the
memory's novelty (how unlike the query is to what the memory bank holds); gap and entropy are the top-1 minus
top-2 raw logit and the entropy of the raw softmax. b alone (c = w = u = a = 0) is ordinary temperature scaling,
which is where the fit starts, so the fit is never worse than temperature scaling on the split it is fitted on;
a two-fold check on that split keeps the full form only where it beats temperature scaling on held-out folds
by a clear margin (`calibration.SELECTION_MARGIN` standard errors).
Until fitted (`fitted == 0`) the calibrator is the identity: T(x) = T_UM(x).
"""

from __future__ import annotations

import torch
from torch import nn

UNCERTAINTY_FEATURES = ("aleatoric", "epistemic", "novelty")
LOGIT_FEATURES = ("gap", "entropy")
TEMPERATURE_RANGE = (1e-3, 1e4)  # wide: a model with random-label heads needs T -> large


def logit_statistics(raw_logits: torch.Tensor) -> torch.Tensor:
    """[..., C] raw logits -> [..., 2]: top-1 minus top-2 logit and the entropy of the softmax."""
    logits = raw_logits.float()
    top = logits.topk(2, dim=-1).values
    log_probs = torch.log_softmax(logits, -1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return torch.stack([top[..., 0] - top[..., 1], entropy], -1)


class TemperatureCalibrator(nn.Module):
    """Buffers of the held-out temperature fit (saved with the adapter); the identity until `fitted`."""

    def __init__(self, memory_dim: int):
        super().__init__()
        num_features = memory_dim + len(UNCERTAINTY_FEATURES) + len(LOGIT_FEATURES)
        self.memory_dim = memory_dim
        self.register_buffer("fitted", torch.zeros((), dtype=torch.long))
        self.register_buffer("bias", torch.zeros(()))
        self.register_buffer("um_weight", torch.ones(()))
        self.register_buffer("weights", torch.zeros(num_features))
        self.register_buffer("feature_mean", torch.zeros(num_features))
        self.register_buffer("feature_std", torch.ones(num_features))
        self.is_fitted = False  # host-side mirror of `fitted`, so the forward pass never syncs to read it

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.is_fitted = bool(self.fitted)

    def mark_fitted(self, fitted: bool) -> None:
        self.fitted.fill_(int(fitted))
        self.is_fitted = fitted

    @staticmethod
    def features(memory: torch.Tensor, aleatoric: torch.Tensor, epistemic: torch.Tensor, novelty: torch.Tensor,
                 raw_logits: torch.Tensor) -> torch.Tensor:
        """[..., F] from M_U [..., m], the uncertainty terms [...] and the raw logits [..., C]."""
        uncertainty = torch.stack([aleatoric.float(), epistemic.float(), novelty.float()], -1)
        return torch.cat([memory.float(), uncertainty, logit_statistics(raw_logits)], -1)

    def log_temperature(self, features: torch.Tensor, um_temperature: torch.Tensor, bias, um_weight, weights):
        z = (features - self.feature_mean) / self.feature_std
        return bias + um_weight * torch.log(um_temperature.float()) + z @ weights

    def forward(self, features: torch.Tensor, um_temperature: torch.Tensor) -> torch.Tensor:
        if not self.is_fitted:
            return um_temperature
        log_t = self.log_temperature(features, um_temperature, self.bias, self.um_weight, self.weights)
        return log_t.exp().clamp(*TEMPERATURE_RANGE).to(um_temperature.dtype)

    def reset(self) -> None:
        self.mark_fitted(False)
        self.bias.zero_()
        self.um_weight.fill_(1.0)
        self.weights.zero_()
        self.feature_mean.zero_()
        self.feature_std.fill_(1.0)
