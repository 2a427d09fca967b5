"""AdUE: a post-hoc uncertainty head for a trained LoRA classifier, with its two reference scores.

AdUE copies the fine-tuned classification head and trains only that copy, on the head's input features, to predict
whether the ORIGINAL model's prediction is wrong: uncertainty = 1 - SmoothMax(softmax(head(features))), with the
p-norm of the probability vector as a differentiable maximum (it lies between max p and 1, so the score stays in
[0, 1] as binary cross-entropy needs), plus L2-SP, ||w - w_finetuned||^2, which keeps the copy near the head it
starts from. The model itself, base and LoRA weights, is never changed, and its predictions stay what they were.

Reference scores: softmax response (the maximum probability) and the Mahalanobis distance to the nearest class
mean under a shared covariance fitted on training features. All three are compared by error-detection AUROC.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peft_umema.evaluation.metrics import error_detection_auroc

from .persistence import SafetensorsState, check_state_keys, check_state_shapes
from .prediction import Batches, classification_head, collect_logits, labeled

_PROBABILITY_EPS = 1e-6


def softmax_response(probs: torch.Tensor) -> torch.Tensor:
    """The maximum class probability, the confidence every other score is measured against."""
    return probs.max(-1).values


class AdUE(SafetensorsState):
    """The AdUE uncertainty head; `fit` on a split the classifier was trained on or a held-out one."""

    def __init__(
        self,
        smooth_max_power: float = 10.0,
        l2sp_weight: float = 0.01,
        learning_rate: float = 1e-3,
        epochs: int = 30,
        batch_size: int = 256,
        seed: int = 0,
    ):
        if smooth_max_power < 1:
            raise ValueError(f"smooth_max_power must be >= 1 (a p-norm), got {smooth_max_power}")
        if l2sp_weight < 0:
            raise ValueError(f"l2sp_weight must be >= 0, got {l2sp_weight}")
        if epochs < 1 or batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
        self.smooth_max_power = smooth_max_power
        self.l2sp_weight = l2sp_weight
        self.learning_rate = learning_rate
        self.epochs = epochs
        self.batch_size = batch_size
        self.seed = seed
        self.head: nn.Linear | None = None

    def fit(self, model: nn.Module, dataloader: Batches) -> list[float]:
        """Train the head copy; returns the full-data loss before training and after every epoch."""
        collected = collect_logits(model, dataloader, capture_features=True)
        features, labels = labeled(collected.features, collected.labels)
        logits, _ = labeled(collected.logits, collected.labels)
        wrong = (logits.argmax(-1) != labels).float()
        fine_tuned = classification_head(model)
        self.head = nn.Linear(fine_tuned.in_features, fine_tuned.out_features, bias=fine_tuned.bias is not None)
        self.head.load_state_dict({name: value.float().cpu() for name, value in fine_tuned.state_dict().items()})
        anchor = {name: param.detach().clone() for name, param in self.head.named_parameters()}
        optimizer = torch.optim.AdamW(self.head.parameters(), lr=self.learning_rate, weight_decay=0.0)
        generator = torch.Generator().manual_seed(self.seed)

        def loss_on(rows: torch.Tensor | slice) -> torch.Tensor:
            uncertainty = self._uncertainty(features[rows]).clamp(_PROBABILITY_EPS, 1 - _PROBABILITY_EPS)
            l2sp = sum(((param - anchor[name]) ** 2).sum() for name, param in self.head.named_parameters())
            return F.binary_cross_entropy(uncertainty, wrong[rows]) + self.l2sp_weight * l2sp

        with torch.no_grad():
            history = [loss_on(slice(None)).item()]
        for _ in range(self.epochs):
            for rows in torch.randperm(len(features), generator=generator).split(self.batch_size):
                optimizer.zero_grad()
                loss_on(rows).backward()
                optimizer.step()
            with torch.no_grad():
                history.append(loss_on(slice(None)).item())
        return history

    def uncertainty_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """1 - SmoothMax(softmax(head(features))) for head inputs of any leading shape."""
        with torch.no_grad():
            return self._uncertainty(features)

    def uncertainty(self, model: nn.Module, dataloader: Batches) -> torch.Tensor:
        """Uncertainty aligned with `collect_labels(dataloader)`: [N] or [N, T]."""
        return self.uncertainty_from_features(collect_logits(model, dataloader, capture_features=True).features)

    def confidence(self, model: nn.Module, dataloader: Batches) -> torch.Tensor:
        return 1 - self.uncertainty(model, dataloader)

    def predict_proba(self, model: nn.Module, dataloader: Batches) -> torch.Tensor:
        """The original model's probabilities: AdUE scores predictions, it does not change them."""
        return collect_logits(model, dataloader).logits.softmax(-1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: value.detach().clone() for name, value in self._fitted_head().state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "weight" not in state or state["weight"].dim() != 2:
            raise ValueError("an AdUE state needs a 2-D `weight` (and optionally `bias`)")
        num_classes, num_features = state["weight"].shape
        has_bias = "bias" in state
        check_state_keys(state, {"weight", "bias"} if has_bias else {"weight"}, type(self).__name__)
        if has_bias:
            check_state_shapes(state, {"bias": torch.Size([num_classes])}, type(self).__name__)
        self.head = nn.Linear(num_features, num_classes, bias=has_bias)
        self.head.load_state_dict({name: value.float() for name, value in state.items()})

    def _uncertainty(self, features: torch.Tensor) -> torch.Tensor:
        head = self._fitted_head()
        if features.shape[-1] != head.in_features:
            raise ValueError(f"features have size {features.shape[-1]}, the AdUE head expects {head.in_features}")
        probs = head(features).softmax(-1)
        return 1 - torch.linalg.vector_norm(probs, ord=self.smooth_max_power, dim=-1)

    def _fitted_head(self) -> nn.Linear:
        if self.head is None:
            raise RuntimeError("the AdUE head is not fitted: call fit() or load() first")
        return self.head


class MahalanobisDistance(SafetensorsState):
    """The Mahalanobis distance of the head's input to the nearest class mean (Lee et al., 2018), with one covariance
    shared by all classes, both fitted on training features with their true labels.

    Its confidence is 1 / (1 + distance): monotone, so rankings (AUROC, risk-coverage) are those of the distance, and
    in [0, 1] like every other confidence the metrics take.
    """

    def __init__(self):
        self.class_means: torch.Tensor | None = None  # [classes seen in training, H]
        self.precision: torch.Tensor | None = None  # [H, H]

    def fit(self, model: nn.Module, dataloader: Batches) -> None:
        collected = collect_logits(model, dataloader, capture_features=True)
        features, labels = labeled(collected.features.double(), collected.labels)
        classes = labels.unique()
        self.class_means = torch.stack([features[labels == label].mean(0) for label in classes])
        centred = features - self.class_means[torch.searchsorted(classes, labels)]
        covariance = centred.T @ centred / len(features)
        # pinv: with few training rows the covariance is singular, and the distance then ignores the null space
        self.precision = torch.linalg.pinv(covariance, hermitian=True)

    def distance_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance to the nearest class mean, for head inputs of any leading shape."""
        means, precision = self._fitted()
        if features.shape[-1] != means.shape[-1]:
            raise ValueError(f"features have size {features.shape[-1]}, the fitted scorer expects {means.shape[-1]}")
        flat = features.reshape(-1, features.shape[-1]).double()
        # one class at a time keeps memory at [rows, H] even for token tasks with many rows
        distances = torch.stack([((flat - mean) @ precision * (flat - mean)).sum(-1) for mean in means])
        return distances.min(0).values.clamp_min(0).reshape(features.shape[:-1])

    def confidence_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return (1 / (1 + self.distance_from_features(features))).float()

    def confidence(self, model: nn.Module, dataloader: Batches) -> torch.Tensor:
        """Confidence aligned with `collect_labels(dataloader)`: [N] or [N, T]."""
        return self.confidence_from_features(collect_logits(model, dataloader, capture_features=True).features)

    def state_dict(self) -> dict[str, torch.Tensor]:
        means, precision = self._fitted()
        return {"class_means": means, "precision": precision}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        check_state_keys(state, {"class_means", "precision"}, type(self).__name__)
        size = state["class_means"].shape[-1]
        check_state_shapes(state, {"precision": torch.Size([size, size])}, type(self).__name__)
        self.class_means = state["class_means"].double()
        self.precision = state["precision"].double()

    def _fitted(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.class_means is None or self.precision is None:
            raise RuntimeError("the Mahalanobis scorer is not fitted: call fit() or load() first")
        return self.class_means, self.precision


def error_detection_comparison(
    model: nn.Module, dataloader: Batches, adue: AdUE, mahalanobis: MahalanobisDistance
) -> dict[str, float]:
    """Error-detection AUROC on `dataloader` of softmax response, Mahalanobis distance and AdUE, from one pass.

    Higher is better: it is the chance that a wrong prediction gets a lower confidence than a right one (NaN when
    the model makes no mistake, or nothing but mistakes, on `dataloader`).
    """
    collected = collect_logits(model, dataloader, capture_features=True)
    logits, labels = labeled(collected.logits, collected.labels)
    features, _ = labeled(collected.features, collected.labels)
    correct = logits.argmax(-1) == labels
    confidences = {
        "softmax_response": softmax_response(logits.softmax(-1)),
        "mahalanobis": mahalanobis.confidence_from_features(features),
        "adue": 1 - adue.uncertainty_from_features(features),
    }
    return {name: error_detection_auroc(confidence, correct) for name, confidence in confidences.items()}
