"""A mixture of LoRA experts in the manner of MixLoRA (Li et al., 2024): each target linear layer keeps its frozen
weights and gains `num_experts` LoRA experts, of which a linear router picks `top_k` per token.

Routing is per linear layer: every wrapped layer has its own router. MixLoRA itself routes once per FFN block,
with LoRA experts on the block's linear layers, and puts plain LoRA on attention; routing each linear layer is our
simplification, which needs no knowledge of where a backbone's FFN blocks are.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer
from transformers.pytorch_utils import Conv1D


class MixLoRALinear(nn.Module):
    """A frozen linear layer plus a routed mixture of LoRA experts:

    y = base(x) + scaling * sum_{e in top_k(router(x))} g_e * B_e A_e dropout(x),

    where g is the softmax over the selected router logits. The experts' A matrices are stacked into one linear
    layer (`lora_A`, [num_experts * rank, in]) and their B matrices into another (`lora_B`, [out, num_experts *
    rank]), so the mixture costs one LoRA of rank num_experts * rank whose hidden units are gated per expert. A
    starts as LoRA's (Kaiming uniform), B at zero, so the layer starts as the base layer.
    """

    def __init__(self, base: nn.Module, *, rank: int, alpha: float, dropout: float, num_experts: int, top_k: int):
        super().__init__()
        in_features, out_features = linear_sizes(base)
        device = base.weight.device
        self.base = base
        self.router = nn.Linear(in_features, num_experts, bias=False, device=device)
        self.lora_A = nn.Linear(in_features, num_experts * rank, bias=False, device=device)
        self.lora_B = nn.Linear(num_experts * rank, out_features, bias=False, device=device)
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / rank
        self.rank = rank
        self.num_experts = num_experts
        self.top_k = top_k
        self.balance_loss: torch.Tensor | None = None  # of the last forward pass

    def routing(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gates [N, num_experts] (the top_k experts' softmax weights, zero elsewhere) and the load-balancing loss
        num_experts * sum_e f_e P_e, where f_e is the fraction of tokens routed to e (among their top_k, so the f_e
        sum to top_k, as in transformers' Mixtral) and P_e the mean router probability of e. Padding positions
        count like the others: the layer does not see the attention mask."""
        logits = self.router(tokens)
        top_logits, top_experts = logits.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(logits).scatter(-1, top_experts, top_logits.softmax(-1))
        routed_fraction = F.one_hot(top_experts, self.num_experts).sum(1).float().mean(0)
        mean_probability = logits.softmax(-1).mean(0)
        return gates, self.num_experts * (routed_fraction * mean_probability).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.base(x)
        tokens = x.reshape(-1, x.shape[-1]).to(self.router.weight.dtype)
        gates, self.balance_loss = self.routing(tokens)
        hidden = self.lora_A(self.dropout(tokens)).view(-1, self.num_experts, self.rank)
        mixed = self.lora_B((hidden * gates.unsqueeze(-1)).flatten(1)) * self.scaling
        return output + mixed.view(*x.shape[:-1], -1).to(output.dtype)


def linear_sizes(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a linear layer; GPT-2's `Conv1D` stores its weight as [in, out]."""
    if isinstance(module, Conv1D):
        return tuple(module.weight.shape)
    return module.in_features, module.out_features


def target_linear_layers(
    model: nn.Module, target_modules: str | Sequence[str], trained_fully: Sequence[str]
) -> list[str]:
    """Full names of the linear layers `target_modules` names, matched as peft matches them (a list of module names
    or name suffixes, or a regular expression the whole name must match), outside the modules trained in full."""

    def targeted(name: str) -> bool:
        if isinstance(target_modules, str):
            return re.fullmatch(target_modules, name) is not None
        return any(name == target or name.endswith(f".{target}") for target in target_modules)

    names = [
        name for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and targeted(name)
        and not set(name.split(".")) & set(trained_fully)
    ]
    if not names:
        raise ValueError(
            f"target_modules={target_modules!r} names no linear layer of {type(model).__name__} outside "
            f"{list(trained_fully)}; name some of its linear layers, or use 'all-linear'."
        )
    return names


def add_mixlora_experts(
    model: nn.Module,
    target_modules: str | Sequence[str],
    trained_fully: Sequence[str],
    *,
    rank: int,
    alpha: float,
    dropout: float,
    num_experts: int,
    top_k: int,
) -> nn.Module:
    """Freeze `model`, wrap every linear layer `target_modules` names in a `MixLoRALinear`, and train the modules
    named in `trained_fully` (the classification head, a BERT-style pooler) in full. Changes `model` in place."""
    model.requires_grad_(False)
    for name in target_linear_layers(model, target_modules, trained_fully):
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        experts = MixLoRALinear(
            getattr(parent, child_name), rank=rank, alpha=alpha, dropout=dropout, num_experts=num_experts, top_k=top_k
        )
        setattr(parent, child_name, experts)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in trained_fully:
            module.requires_grad_(True)
    return model


def load_balancing_loss(model: nn.Module) -> torch.Tensor:
    """The mean over `model`'s MixLoRA layers of their load-balancing losses in the last forward pass."""
    losses = [module.balance_loss for module in model.modules() if isinstance(module, MixLoRALinear)]
    if not losses:
        raise ValueError(f"{type(model).__name__} has no MixLoRA layers; wrap it with add_mixlora_experts first.")
    return torch.stack(losses).mean()


class MixLoRATrainer(Trainer):
    """`Trainer` whose loss is the task loss plus `aux_loss_coefficient` times `load_balancing_loss(model)`, which
    keeps the routers from sending every token to the same experts."""

    def __init__(self, *args, aux_loss_coefficient: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.aux_loss_coefficient = aux_loss_coefficient

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        loss = loss + self.aux_loss_coefficient * load_balancing_loss(model)
        return (loss, outputs) if return_outputs else loss
