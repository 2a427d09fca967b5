"""The fixed-size key-value memory bank of EMA (paper 3.2): buffers, FIFO writes, no gradients."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class MemoryBank(nn.Module):
    """J key-value slots of size d, Xavier-uniform initialised, written first-in-first-out.

    Training forward passes queue their batch summaries; `commit()` turns everything queued since the last commit
    into ONE slot write (the batch-size-weighted mean), so one optimizer step writes one slot whether its batch came
    in one piece, in gradient-accumulation micro-batches, or split over data-parallel ranks (the ranks' sums are
    all-reduced, so every rank writes the same slot with the same content). A write edits one slot in place (O(d)
    whatever J), so commit after the backward pass: autograd refuses a backward through slots edited since.

    The bank also keeps running per-dimension sums of the individual retrieval queries of the task's training
    examples (`query_sum`, `query_sq_sum`, `query_count`), so that `novelty` can say how unlike them a new query is:
    the slots themselves are batch means, too smooth to compare single examples with. Sums gathered while the query
    projection trains (and under dropout) describe no single model, so training ends by replacing them with those
    of the final model in eval mode (`UMEMAModel.refresh_query_statistics`).
    """

    def __init__(self, memory_size: int, dim: int):
        super().__init__()
        self.memory_size = memory_size
        self.dim = dim
        self.register_buffer("keys", torch.empty(memory_size, dim))
        self.register_buffer("values", torch.empty(memory_size, dim))
        self.register_buffer("write_pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("fill_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("query_sum", torch.zeros(dim))
        self.register_buffer("query_sq_sum", torch.zeros(dim))
        self.register_buffer("query_count", torch.zeros(()))
        # [4 * dim + 2]: key sum, value sum, item count, query sum, query square sum, query count
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
        self.query_sum = torch.zeros_like(self.query_sum)
        self.query_sq_sum = torch.zeros_like(self.query_sq_sum)
        self.query_count = torch.zeros_like(self.query_count)
        self._pending_sum, self.pending_writes = None, 0

    def queue_write(self, keys: torch.Tensor, values: torch.Tensor, weights: torch.Tensor | None = None,
                    queries: torch.Tensor | None = None) -> None:
        """Add the [B, d] write keys and values of one training batch to the pending write, and the batch's
        retrieval `queries` [B, d] to the query statistics; `weights` [B] (0 or 1) leaves rows out without a host
        sync."""
        keys, values = keys.detach().float(), values.detach().float()
        if weights is None:
            weights = torch.ones(keys.shape[0], device=keys.device)
        weights = weights.float().unsqueeze(-1)
        query_part = torch.zeros(2 * self.dim + 1, device=keys.device)
        if queries is not None:
            queries = queries.detach().float()
            query_part = torch.cat([(weights * queries).sum(0), (weights * queries**2).sum(0), weights.sum(0)])
        batch = torch.cat([(weights * keys).sum(0), (weights * values).sum(0), weights.sum(0), query_part])
        self._pending_sum = batch if self._pending_sum is None else self._pending_sum + batch
        self.pending_writes += 1

    @torch.no_grad()
    def novelty(self, queries: torch.Tensor) -> torch.Tensor:
        """[B, d] -> [B]: |log mean_k (q_k - mu_k)^2 / var_k|, how far each query's squared standardised distance
        to the training queries of this task lies from its in-distribution value 1 (a typicality test: queries of
        unfamiliar inputs land too far from the mean, or collapse too close to it); 0 before two have been seen."""
        count = float(self.query_count)
        if count < 2:
            return torch.zeros(queries.shape[0], device=queries.device)
        mean = self.query_sum / count
        variance = (self.query_sq_sum / count - mean**2).clamp_min(1e-6)
        return torch.log(((queries.float() - mean) ** 2 / variance).mean(-1).clamp_min(1e-12)).abs()

    def set_query_statistics(self, queries_sum: torch.Tensor, squares_sum: torch.Tensor, count: torch.Tensor) -> None:
        """Replace the query statistics by these sums (of the final model's queries over the training data)."""
        self.query_sum.copy_(queries_sum)
        self.query_sq_sum.copy_(squares_sum)
        self.query_count.copy_(count)

    def discard_pending(self) -> None:
        """Drop what was queued since the last commit (the steps of a diverged run)."""
        self._pending_sum, self.pending_writes = None, 0

    def commit(self, step: int | None = None) -> bool:
        """Write the pending batch summary into the oldest slot; returns whether a slot was written. A non-finite
        summary (a diverged model) raises and leaves the bank untouched; `step` names the step in that message."""
        pending = self._pending_sum
        if pending is None:
            pending = torch.zeros(4 * self.dim + 2, device=self.keys.device)
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
            query = pending[2 * self.dim + 1 :]
            self.query_sum.add_(query[: self.dim])
            self.query_sq_sum.add_(query[self.dim : 2 * self.dim])
            self.query_count.add_(query[-1])
        return True

    def extra_repr(self) -> str:
        return f"memory_size={self.memory_size}, dim={self.dim}"
