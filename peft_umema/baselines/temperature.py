"""Temperature scaling (Guo et al., 2017): one scalar T fitted post hoc on the dev split, logits / T."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .persistence import SafetensorsState, check_state_keys
from .prediction import Batches, collect_logits, labeled


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature minimising the NLL of `logits / T` on (`logits`, `labels`).

    Accepts [N, C] with [N], or token logits [N, T, C] with [N, T] (positions labeled -100 are ignored). LBFGS runs on
    log T, which keeps T positive without a constraint, in float64 so that the line search stays well behaved.
    """
    if logits.dim() < 2:
        raise ValueError(f"logits must be [N, C] or [N, T, C], got shape {tuple(logits.shape)}")
    logits, labels = labeled(logits.detach().double(), labels.detach())
    if not torch.isfinite(logits).all():
        raise ValueError("logits contain NaN or infinite values")
    if labels.min() < 0 or labels.max() >= logits.shape[-1]:
        raise ValueError(f"labels must lie in [0, {logits.shape[-1]}) or be -100")
    log_temperature = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_temperature], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_temperature.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return math.exp(log_temperature.item())


class TemperatureScaling(SafetensorsState):
    """Divides a model's logits by one fitted temperature; T > 1 softens an over-confident model."""

    def __init__(self, temperature: float = 1.0):
        self._validate(temperature)
        self.temperature = float(temperature)

    def fit(self, model: nn.Module, dataloader: Batches) -> float:
        """Fit T on `dataloader` (the dev split) and return it."""
        collected = collect_logits(model, dataloader)
        self.temperature = fit_temperature(collected.logits, collected.labels)
        return self.temperature

    def calibrate(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits / self.temperature).softmax(-1)

    def predict_proba(self, model: nn.Module, dataloader: Batches) -> torch.Tensor:
        return self.calibrate(collect_logits(model, dataloader).logits)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"temperature": torch.tensor(self.temperature, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        check_state_keys(state, {"temperature"}, type(self).__name__)
        temperature = state["temperature"].item()
        self._validate(temperature)
        self.temperature = temperature

    @staticmethod
    def _validate(temperature: float) -> None:
        if not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a positive finite number, got {temperature}")
