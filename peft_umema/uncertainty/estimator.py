"""Uncertainty Modeling (paper 3.1): guidance, token confidence, propagation, summary, decomposition, calibration.

Equations as implemented are in `docs/method.md`; every step names the paper's stage it implements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .calibrator import TemperatureCalibrator

_EPS = 1e-6


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the token axis (dim 1) of `x` [B, T, ...] counting only tokens where `mask` [B, T] is true."""
    weights = mask.to(x.dtype)
    while weights.dim() < x.dim():
        weights = weights.unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), dim=dim)


@dataclass
class UncertaintyState:
    """Everything UM produces for one batch; token tensors are [B, T], sequence tensors [B]."""

    raw_confidence: torch.Tensor  # u_i
    quantized_confidence: torch.Tensor  # q_i
    importance: torch.Tensor  # a_i, sums to 1 over the valid tokens of a sequence
    token_feature: torch.Tensor  # z_i = a_i * q_i
    token_confidence: torch.Tensor  # propagated confidence of each token after the last layer
    sequence_confidence: torch.Tensor  # mu_U
    dispersion: torch.Tensor  # s_U
    memory: torch.Tensor  # M_U [B, uncertainty_memory_dim]
    token_aleatoric: torch.Tensor
    token_epistemic: torch.Tensor
    aleatoric: torch.Tensor
    epistemic: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.aleatoric + self.epistemic

    @property
    def token_total(self) -> torch.Tensor:
        return self.token_aleatoric + self.token_epistemic


class UncertaintyEstimator(nn.Module):
    """Token- and sequence-level confidence with an aleatoric / epistemic split and a calibration temperature.

    Inputs are the token embeddings X (for the domain and semantic guidance), the token representation the
    confidence is read from, and the hidden states of the last P backbone layers whose token affinities propagate it.
    """

    def __init__(
        self,
        hidden_size: int,
        guidance_dim: int,
        memory_dim: int,
        num_tasks: int,
        quantization_levels: int,
        propagation_rank: int,
        min_temperature: float,
        token_level: bool,
    ):
        super().__init__()
        self.quantization_levels = quantization_levels
        self.min_temperature = min_temperature
        self.token_level = token_level
        self.propagation_rank = propagation_rank
        # guidance construction: K_d (mean of X), K_t (task embedding), K_s (max of X), K_p (shared prior)
        self.embedding_norm = nn.LayerNorm(hidden_size)
        self.domain_proj = nn.Linear(hidden_size, guidance_dim)
        self.semantic_proj = nn.Linear(hidden_size, guidance_dim)
        self.task_embedding = nn.Embedding(num_tasks, guidance_dim)
        self.task_proj = nn.Linear(guidance_dim, guidance_dim)
        self.prior = nn.Parameter(torch.zeros(guidance_dim))
        self.prior_proj = nn.Linear(guidance_dim, guidance_dim)
        self.guidance_norm = nn.LayerNorm(guidance_dim)
        # uncertainty feature mapping: each token state interacts with the guidance E
        self.hidden_norm = nn.LayerNorm(hidden_size)
        self.token_proj = nn.Linear(hidden_size, guidance_dim)
        self.guidance_to_token = nn.Linear(guidance_dim, guidance_dim, bias=False)
        self.confidence_head = nn.Linear(guidance_dim, 1)
        self.importance_head = nn.Linear(guidance_dim, 1)
        # propagation: token affinities from the hidden states of each propagated layer
        self.affinity_query = nn.Linear(hidden_size, propagation_rank, bias=False)
        self.affinity_key = nn.Linear(hidden_size, propagation_rank, bias=False)
        # summary: compact uncertainty memory M_U from [mu_U, s_U, E]
        self.memory_mlp = nn.Sequential(
            nn.Linear(guidance_dim + 2, memory_dim), nn.GELU(), nn.Linear(memory_dim, memory_dim)
        )
        # calibration: T = T_min + softplus(w . features + b + gamma * v), gamma >= 0 keeps T increasing in v
        self.temperature_proj = nn.Linear(memory_dim + (2 if token_level else 0), 1)
        self.uncertainty_gain = nn.Parameter(torch.zeros(1))  # 1-d: DeepSpeed cannot broadcast 0-d parameters
        # reported confidence = sigmoid(m0 logit(c_UM) + m1 logit(max calibrated prob) + m2 + m_n novelty): UM's own
        # until a dev refit (calibration.py) sets it; buffers, since training data has too few errors to learn from
        self.register_buffer("confidence_map", torch.tensor([1.0, 0.0, 0.0]))
        self.register_buffer("confidence_novelty_weight", torch.zeros(1))
        # the temperature reported after a held-out fit (calibrator.py); the identity until then
        self.calibrator = TemperatureCalibrator(memory_dim)
        self.reset_calibration()

    def reset_calibration(self) -> None:
        """Start at T = 1 for zero uncertainty, so an untrained UM does not distort the classifier."""
        nn.init.zeros_(self.temperature_proj.weight)
        nn.init.constant_(self.temperature_proj.bias, math.log(math.expm1(1.0 - self.min_temperature)))

    def guidance(self, embeddings: torch.Tensor, mask: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding_norm(embeddings)
        domain = masked_mean(x, mask)
        semantic = x.masked_fill(~mask.unsqueeze(-1), torch.finfo(x.dtype).min).amax(1)
        # a row without any valid token (all padding) has no maximum: use 0, not the fill value (it overflows)
        semantic = torch.where(mask.any(1, keepdim=True), semantic, torch.zeros_like(semantic))
        task = self.task_embedding(task_ids)
        fused = (
            self.domain_proj(domain)
            + self.task_proj(task)
            + self.semantic_proj(semantic)
            + self.prior_proj(self.prior).expand_as(task)
        )
        return self.guidance_norm(fused)

    def quantize(self, confidence: torch.Tensor) -> torch.Tensor:
        """Q levels at the bin centres (k + 1/2) / Q, never exactly 0 or 1, so a saturated token keeps a usable
        confidence and a non-zero aleatoric term; the straight-through gradient still trains u."""
        levels = self.quantization_levels
        centres = (torch.floor(confidence * levels).clamp(max=levels - 1) + 0.5) / levels
        return confidence + (centres - confidence).detach()

    def forward(
        self,
        embeddings: torch.Tensor,
        token_states: torch.Tensor,
        propagation_states: list[torch.Tensor],
        mask: torch.Tensor,
        task_ids: torch.Tensor,
    ) -> UncertaintyState:
        dtype = self.prior.dtype
        guidance = self.guidance(embeddings.to(dtype), mask, task_ids)

        first = self.hidden_norm(token_states.to(dtype))
        features = torch.tanh(self.token_proj(first) + self.guidance_to_token(guidance).unsqueeze(1))
        raw = torch.sigmoid(self.confidence_head(features).squeeze(-1))
        quantized = self.quantize(raw)
        importance = masked_softmax(self.importance_head(features).squeeze(-1), mask)
        token_feature = importance * quantized

        # propagation across tokens and layers: U <- (U + A_l U) / 2 keeps U in (0, 1)
        propagated = [quantized]
        key_mask = mask.unsqueeze(1)
        for hidden in propagation_states:
            h = self.hidden_norm(hidden.to(dtype))
            scores = self.affinity_query(h) @ self.affinity_key(h).transpose(1, 2) / math.sqrt(self.propagation_rank)
            affinity = masked_softmax(scores, key_mask)
            current = propagated[-1]
            propagated.append(0.5 * (current + (affinity @ current.unsqueeze(-1)).squeeze(-1)))
        stack = torch.stack(propagated, 0)  # [P+1, B, T]
        token_confidence = stack[-1]

        # summary: importance-weighted mean and dispersion of the propagated confidence, then M_U
        layer_means = (stack * importance.unsqueeze(0)).sum(-1)  # [P+1, B]
        mean = layer_means[-1]
        deviation = (token_confidence - mean.unsqueeze(-1)) ** 2
        dispersion = torch.sqrt((importance * deviation).sum(-1) + _EPS)
        memory = self.memory_mlp(torch.cat([mean.unsqueeze(-1), dispersion.unsqueeze(-1), guidance], -1))

        # decomposition: aleatoric = local fluctuation + quantization, epistemic = propagation dispersion
        token_aleatoric = quantized * (1 - quantized) + (raw - quantized) ** 2
        layer_variance = stack.var(0, unbiased=False) if stack.shape[0] > 1 else torch.zeros_like(raw)
        token_epistemic = deviation + layer_variance
        aleatoric = masked_mean(token_aleatoric, mask)
        mean_variance = layer_means.var(0, unbiased=False) if stack.shape[0] > 1 else torch.zeros_like(mean)
        epistemic = dispersion**2 + mean_variance

        return UncertaintyState(
            raw_confidence=raw,
            quantized_confidence=quantized,
            importance=importance,
            token_feature=token_feature,
            token_confidence=token_confidence,
            sequence_confidence=mean,
            dispersion=dispersion,
            memory=memory,
            token_aleatoric=token_aleatoric,
            token_epistemic=token_epistemic,
            aleatoric=aleatoric,
            epistemic=epistemic,
        )

    def temperature_inputs(self, state: UncertaintyState) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of the temperature head and the total uncertainty v, per example or per token."""
        if not self.token_level:
            return state.memory, state.total
        seq_len = state.token_feature.shape[1]
        features = torch.cat(
            [
                state.memory.unsqueeze(1).expand(-1, seq_len, -1),
                state.token_feature.unsqueeze(-1),
                state.token_confidence.unsqueeze(-1),
            ],
            -1,
        )
        return features, state.token_total

    def temperature(self, state: UncertaintyState) -> torch.Tensor:
        """[B] for sequence tasks, [B, T] for token tasks; grows with the total uncertainty v."""
        features, uncertainty = self.temperature_inputs(state)
        logit = self.temperature_proj(features).squeeze(-1) + F.softplus(self.uncertainty_gain) * uncertainty
        return self.min_temperature + F.softplus(logit)


    def reported_confidence(
        self, um_confidence: torch.Tensor, calibrated_logits: torch.Tensor, novelty: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """UM's confidence stacked with the calibrated maximum probability and the memory's novelty (per example,
        broadcast to its tokens; absent in training) through `confidence_map` and `confidence_novelty_weight`."""
        max_prob = torch.softmax(calibrated_logits.float(), -1).amax(-1)
        stacked = (
            self.confidence_map[0] * torch.logit(um_confidence.float(), eps=_EPS)
            + self.confidence_map[1] * torch.logit(max_prob, eps=_EPS)
            + self.confidence_map[2]
        )
        if novelty is not None:
            novelty = novelty.float().reshape(novelty.shape + (1,) * (stacked.dim() - novelty.dim()))
            stacked = stacked + self.confidence_novelty_weight * novelty
        return torch.sigmoid(stacked)


def confidence_targets_loss(
    confidence: torch.Tensor, correct: torch.Tensor, valid: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed BCE between UM confidence and whether the prediction was right, and the count it sums over."""
    confidence = confidence.clamp(_EPS, 1 - _EPS)
    losses = F.binary_cross_entropy(confidence, correct.to(confidence.dtype), reduction="none")
    if valid is not None:
        losses = losses[valid]
    return losses.sum(), torch.tensor(losses.numel(), device=losses.device)
