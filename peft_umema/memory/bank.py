"""The fixed-size key-value memory bank of EMA (paper 3.2): buffers, FIFO writes, no gradients."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class MemoryBank(nn.Module):
    """J key-value slots of size d, Xavier-uniform initialised, written first-in-first-out.

    Writes are queued during a training forward pass and applied by `commit()` once the backward pass has used the
    slots (writing earlier would invalidate autograd's saved tensors). `commit()` replaces the buffers instead of
    editing them in place, so a graph that still holds the old slots stays valid. Under `torch.distributed`, each
    commit averages the ranks' pending writes (weighted by batch size), so every rank writes the same slot with the
    same content and the banks stay identical.
    """

    def __init__(self, memory_size: int, dim: int):
        super().__init__()
        self.memory_size = memory_size
        self.dim = dim
        self.register_buffer("keys", torch.empty(memory_size, dim))
        self.register_buffer("values", torch.empty(memory_size, dim))
        self.register_buffer("write_pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("fill_count", torch.zeros((), dtype=torch.long))
        self._pending: list[tuple[torch.Tensor, torch.Tensor, int]] = []
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
        self._pending.clear()

    @property
    def pending_writes(self) -> int:
        return len(self._pending)

    def queue_write(self, key: torch.Tensor, value: torch.Tensor, batch_size: int) -> None:
        """Remember one (key, value) summary of a training mini-batch; applied by `commit()`."""
        self._pending.append((key.detach(), value.detach(), batch_size))
        # a caller that never commits must not grow memory without bound: only the newest J writes can survive
        if len(self._pending) > self.memory_size:
            del self._pending[0]

    def commit(self) -> int:
        """Apply the queued writes in order; returns how many slots were written."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            writes = self._gather_across_ranks()
        else:
            writes = [(k, v) for k, v, _ in self._pending]
        self._pending.clear()
        if not writes:
            return 0
        keys, values = self.keys.clone(), self.values.clone()
        pointer, filled = int(self.write_pointer), int(self.fill_count)
        for key, value in writes:
            keys[pointer] = key.to(keys)
            values[pointer] = value.to(values)
            pointer = (pointer + 1) % self.memory_size
            filled = min(filled + 1, self.memory_size)
        self.keys, self.values = keys, values
        self.write_pointer = torch.full_like(self.write_pointer, pointer)
        self.fill_count = torch.full_like(self.fill_count, filled)
        return len(writes)

    def _gather_across_ranks(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Batch-size-weighted mean of the i-th pending write of every rank, so all ranks write the same slots."""
        count = torch.tensor([len(self._pending)], device=self.keys.device)
        counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
        dist.all_gather(counts, count)
        if len({int(c) for c in counts}) != 1:
            raise RuntimeError(
                f"Ranks hold different numbers of pending memory writes ({[int(c) for c in counts]}); commit the "
                "memory on every rank at the same step (MemoryUpdateCallback does this)."
            )
        if not self._pending:
            return []
        keys = torch.stack([k.to(self.keys) for k, _, _ in self._pending])
        values = torch.stack([v.to(self.values) for _, v, _ in self._pending])
        sizes = torch.tensor([n for _, _, n in self._pending], device=keys.device, dtype=keys.dtype)
        stacked = torch.cat([keys * sizes[:, None], values * sizes[:, None], sizes[:, None]], 1)
        dist.all_reduce(stacked)
        total = stacked[:, -1:].clamp_min(1)
        keys, values = stacked[:, : self.dim] / total, stacked[:, self.dim : 2 * self.dim] / total
        return list(zip(keys, values))

    def extra_repr(self) -> str:
        return f"memory_size={self.memory_size}, dim={self.dim}"
