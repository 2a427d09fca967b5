"""EMA (paper 3.2): uncertainty-controlled retrieval from the memory bank and gated fusion into the head input."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .bank import MemoryBank


class MemoryAugmentation(nn.Module):
    """Query from [c ; M_U], softmax retrieval sharpened or softened by uncertainty, gated fusion.

    Sequence tasks replace part of the representation, h~ = g * r + (1 - g) * h; token tasks add to it,
    h~_i = h_i + g_i * r, since one retrieval per sequence should not overwrite token-specific evidence.
    """

    def __init__(
        self,
        hidden_size: int,
        memory_size: int,
        uncertainty_dim: int,
        retrieval_temperature: float,
        gate_bias_init: float,
        token_level: bool,
        top_k: Optional[int] = None,
        reference_size: int = 0,
    ):
        super().__init__()
        self.token_level = token_level
        self.top_k = top_k
        self.retrieval_temperature = retrieval_temperature
        self.scale = math.sqrt(hidden_size)
        self.bank = MemoryBank(memory_size, hidden_size, reference_size)
        self.query_proj = nn.Linear(hidden_size + uncertainty_dim, hidden_size)
        self.gate_hidden = nn.Linear(hidden_size, hidden_size)
        self.gate_context = nn.Linear(hidden_size + uncertainty_dim, hidden_size, bias=False)
        # beta >= 0 through softplus: retrieval only ever softens as uncertainty grows
        self.uncertainty_sharpness = nn.Parameter(torch.zeros(1))  # 1-d: DeepSpeed cannot broadcast 0-d parameters
        nn.init.constant_(self.gate_hidden.bias, gate_bias_init)

    def query(self, summary: torch.Tensor, uncertainty_memory: Optional[torch.Tensor]) -> torch.Tensor:
        parts = [summary] if uncertainty_memory is None else [summary, uncertainty_memory]
        return self.query_proj(torch.cat(parts, -1))

    def retrieve(self, query: torch.Tensor, uncertainty: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the read vector r [B, d] and the slot weights alpha [B, J]."""
        tau = torch.full_like(query[:, 0], self.retrieval_temperature)
        if uncertainty is not None:
            tau = tau * (1 + F.softplus(self.uncertainty_sharpness) * uncertainty)
        keys, values = self.bank.keys.to(query.dtype), self.bank.values.to(query.dtype)
        scores = query @ keys.T / (self.scale * tau.unsqueeze(-1))
        if self.top_k is None or self.top_k >= scores.shape[-1]:
            weights = torch.softmax(scores, -1)
            return weights @ values, weights
        # sparse read: softmax over the k best slots only; the [B, k, d] gather replaces the dense [B, J] x [J, d]
        best, slots = scores.topk(self.top_k, dim=-1)
        top_weights = torch.softmax(best, -1)
        read = (top_weights.unsqueeze(-1) * values[slots]).sum(1)
        return read, torch.zeros_like(scores).scatter(-1, slots, top_weights)

    def fuse(
        self, hidden: torch.Tensor, read: torch.Tensor, uncertainty_memory: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """Gate per position of `hidden` ([B, d] or [B, T, d]) from [h ; r ; M_U]."""
        parts = [read] if uncertainty_memory is None else [read, uncertainty_memory]
        context = self.gate_context(torch.cat(parts, -1))
        if hidden.dim() == 3:
            context, read = context.unsqueeze(1), read.unsqueeze(1)
        gate = torch.sigmoid(self.gate_hidden(hidden) + context)
        if self.token_level:
            return hidden + gate * read
        return gate * read + (1 - gate) * hidden

    def queue_write(self, fused_summary: torch.Tensor, uncertainty_memory: Optional[torch.Tensor],
                    weights: Optional[torch.Tensor] = None) -> None:
        """Queue this batch's write: key in query space (so similar contexts find it), value = the fused state;
        the bank stores their (`weights`-weighted) mean over the mini-batch."""
        with torch.no_grad():
            keys = self.query(fused_summary, uncertainty_memory)
        self.bank.queue_write(keys, fused_summary.detach(), weights)
