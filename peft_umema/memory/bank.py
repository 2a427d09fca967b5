"""The fixed-size key-value memory bank of EMA (paper 3.2): buffers, FIFO writes, no gradients."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class MemoryBank(nn.Module):
    """J key-value slots of size d, Xavier-uniform initialised, written first-in-first-out.

    Training forward passes queue their batch summaries; `commit()` turns everything queued since the last commit
    into ONE slot write (the batch-size-weighted mean), so one optimizer step writes one slot whether its batch came
    in one piece, in gradient-accumulation micro-batches, or split over data-parallel ranks (the ranks' sums are
    all-reduced, so every rank writes the same slot with the same content). A write edits one slot in place (O(d)
    whatever J), so commit after the backward pass: autograd refuses a backward through slots edited since.

    Besides the slots, the bank keeps `reference_size` unit-length context summaries of individual training examples
    (`references`, the first `reference_count` rows), the reference of `novelty`: the slots are batch means, too
    smooth to compare single examples with (every query points the way of their common mean). Summaries taken while
    the model trains describe no single model, so the references are set once training ends, from the final model
    in eval mode (`UMEMAModel.refresh_novelty_references`).
    """

    def __init__(self, memory_size: int, dim: int, reference_size: int = 0):
        super().__init__()
        self.memory_size = memory_size
        self.dim = dim
        self.reference_size = reference_size
        self.register_buffer("keys", torch.empty(memory_size, dim))
        self.register_buffer("values", torch.empty(memory_size, dim))
        self.register_buffer("write_pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("fill_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("references", torch.zeros(reference_size, dim))
        self.register_buffer("reference_count", torch.zeros((), dtype=torch.long))
        # [2 * dim + 1]: key sum, value sum, item count
        self._pending_sum: torch.Tensor | None = None
        self.pending_writes = 0
        self.reset()

    def reset(self, generator: torch.Generator | None = None) -> None:
        """A fresh bank for a new task: Xavier-uniform slots, pointer and fill count at zero, nothing pending."""
        keys = torch.empty(self.memory_size, self.dim, device=self.keys.device)
        values = torch.empty_like(keys)
        nn.init.xavier_uniform_(keys, generator=generator)
        nn.init.xavier_uniform_(values, generator=generator)
        self.keys = keys.to(self.keys.dtype)
        self.values = values.to(self.values.dtype)
        self.write_pointer = torch.zeros_like(self.write_pointer)
        self.fill_count = torch.zeros_like(self.fill_count)
        self.references = torch.zeros_like(self.references)
        self.reference_count = torch.zeros_like(self.reference_count)
        self._pending_sum, self.pending_writes = None, 0

    def queue_write(self, keys: torch.Tensor, values: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add the [B, d] write keys and values of one training batch to the pending write; `weights` [B] (0 or 1)
        leaves rows out without a host sync."""
        keys, values = keys.detach().float(), values.detach().float()
        if weights is None:
            weights = torch.ones(keys.shape[0], device=keys.device)
        weights = weights.float().unsqueeze(-1)
        batch = torch.cat([(weights * keys).sum(0), (weights * values).sum(0), weights.sum(0)])
        self._pending_sum = batch if self._pending_sum is None else self._pending_sum + batch
        self.pending_writes += 1

    @torch.no_grad()
    def novelty(self, summaries: torch.Tensor) -> torch.Tensor:
        """[B, d] -> [B] in [0, 2]: 1 - the cosine similarity of each context summary to its nearest reference (a
        nearest-neighbour test of how unlike every training example the input is); 0 while there is no reference."""
        count = int(self.reference_count)
        if count == 0:
            return torch.zeros(summaries.shape[0], device=summaries.device)
        queries = F.normalize(summaries.float(), dim=-1)
        return 1 - (queries @ self.references[:count].to(queries.device).T).amax(-1)

    def set_references(self, summaries: torch.Tensor) -> None:
        """Replace the references by these [n, d] context summaries (n <= reference_size), stored at unit length."""
        count = summaries.shape[0]
        if count > self.reference_size:
            raise ValueError(f"{count} reference summaries do not fit the bank's {self.reference_size} rows.")
        references = torch.zeros_like(self.references)
        references[:count] = F.normalize(summaries.to(references), dim=-1)
        self.references = references
        self.reference_count = torch.full_like(self.reference_count, count)

    def discard_pending(self) -> None:
        """Drop what was queued since the last commit (the steps of a diverged run)."""
        self._pending_sum, self.pending_writes = None, 0

    def commit(self, step: int | None = None) -> bool:
        """Write the pending batch summary into the oldest slot; returns whether a slot was written. A non-finite
        summary (a diverged model) raises and leaves the bank untouched; `step` names the step in that message."""
        pending = self._pending_sum
        if pending is None:
            pending = torch.zeros(2 * self.dim + 1, device=self.keys.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            pending = pending.to(self.keys.device).clone()
            dist.all_reduce(pending)  # every rank must commit at the same step (MemoryUpdateCallback does)
        self._pending_sum, self.pending_writes = None, 0
        count, finite = torch.stack([pending[2 * self.dim], torch.isfinite(pending).all().float()]).tolist()  # 1 sync
        if count == 0:
            return False
        key, value = pending[: self.dim] / count, pending[self.dim : 2 * self.dim] / count
        if not finite:
            where = f" at optimizer step {step}" if step is not None else ""
            raise FloatingPointError(
                f"The memory write{where} is not finite (NaN or inf): the model diverged. The bank was left "
                "untouched; lower the learning rate or check the inputs, and restart from the last checkpoint."
            )
        pointer = int(self.write_pointer)
        with torch.no_grad():
            self.keys[pointer].copy_(key)
            self.values[pointer].copy_(value)
            self.write_pointer.fill_((pointer + 1) % self.memory_size)
            self.fill_count.fill_(min(int(self.fill_count) + 1, self.memory_size))
        return True

    def extra_repr(self) -> str:
        return f"memory_size={self.memory_size}, dim={self.dim}, reference_size={self.reference_size}"
