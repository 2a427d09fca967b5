"""Monte Carlo dropout (Gal & Ghahramani, 2016): dropout left on at prediction, probabilities averaged over passes."""

from __future__ import annotations

import torch
from torch import nn

from .prediction import (
    Batches,
    active_dropout_layers,
    collect_logits,
    model_device,
    seeded,
)


class MCDropout:
    """Averages `num_samples` stochastic passes in which only the dropout layers are in training mode.

    Any `nn.Dropout` with p > 0 counts, LoRA's `lora_dropout` included, so a backbone without dropout (Llama) still
    works when the adapter was configured with `lora_dropout > 0`. Passes are seeded, so a prediction is repeatable.
    """

    def __init__(self, num_samples: int = 10, seed: int = 0):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = num_samples
        self.seed = seed

    def predict_samples(self, model: nn.Module, dataloader: Batches) -> torch.Tensor:
        """Probabilities of every pass, [S, N, C] or [S, N, T, C]."""
        if not active_dropout_layers(model):
            raise ValueError(
                f"{type(model).__name__} has no dropout layer with p > 0, so MC dropout cannot sample; "
                "use a backbone with dropout or an adapter with LoraConfig(lora_dropout > 0)"
            )
        samples = []
        with seeded(self.seed, model_device(model)):
            for _ in range(self.num_samples):
                samples.append(collect_logits(model, dataloader, keep_dropout=True).logits.softmax(-1))
        return torch.stack(samples)

    def predict_proba(self, model: nn.Module, dataloader: Batches) -> torch.Tensor:
        return self.predict_samples(model, dataloader).mean(0)
