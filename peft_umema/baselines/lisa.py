"""LISA (Pan et al., 2024, "Layerwise Importance Sampling for memory-efficient LLM fine-tuning"): full-parameter
fine-tuning in which everything outside the transformer blocks (embeddings, pooler, final norm, head) always trains
and only `active_layers` of the blocks train at a time, resampled uniformly every `interval` optimizer steps.
"""

from __future__ import annotations

import numpy as np
from torch import nn
from transformers import TrainerCallback


def sampled_blocks(num_blocks: int, active_layers: int, seed: int, period: int) -> list[int]:
    """The blocks that train during `period` (optimizer steps `period * interval` onwards): a function of the seed
    and the period alone, so that a run resumed from a checkpoint samples the same blocks as the run it continues."""
    generator = np.random.default_rng((seed, period))
    return sorted(generator.choice(num_blocks, size=active_layers, replace=False).tolist())


class LISACallback(TrainerCallback):
    """Freezes all blocks but the sampled ones, at the start of training and of every `interval`-th step.

    The Trainer builds its optimizer with every parameter trainable before `on_train_begin`; a frozen block then
    gets no gradient (`grad` stays None after the Trainer's `zero_grad`), and AdamW skips it, momentum, weight decay
    and all. Sampling at `on_train_begin` too covers a run resumed in the middle of a period.
    """

    def __init__(self, blocks: nn.ModuleList, active_layers: int, interval: int, seed: int):
        if active_layers > len(blocks):
            raise ValueError(
                f"active_layers={active_layers}, but the model has only {len(blocks)} transformer blocks; choose at "
                f"most {len(blocks)}."
            )
        self.blocks = blocks
        self.active_layers = active_layers
        self.interval = interval
        self.seed = seed

    def on_train_begin(self, args, state, control, **kwargs):
        self.activate(state.global_step // self.interval)

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step % self.interval == 0:
            self.activate(state.global_step // self.interval)

    def activate(self, period: int) -> None:
        active = set(sampled_blocks(len(self.blocks), self.active_layers, self.seed, period))
        for index, block in enumerate(self.blocks):
            block.requires_grad_(index in active)


def trainable_at_once(model: nn.Module, blocks: nn.ModuleList, active_layers: int) -> int:
    """How many parameters train at any one time: all outside the blocks, plus the `active_layers` largest blocks."""
    block_sizes = sorted((parameter_count(block) for block in blocks), reverse=True)
    return parameter_count(model) - sum(block_sizes) + sum(block_sizes[:active_layers])


def parameter_count(module: nn.Module) -> int:
    """Parameters of `module`, tied ones counted once."""
    return sum(parameter.numel() for parameter in module.parameters())
