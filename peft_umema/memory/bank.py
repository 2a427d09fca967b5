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
    all-reduced, so every rank writes the same slot with the same content). Commit after the backward pass: the
    write replaces the buffers instead of editing them in place, so a graph holding the old slots stays valid.
    """

    def __init__(self, memory_size: int, dim: int):
        super().__init__()
        self.memory_size = memory_size
        self.dim = dim
        self.register_buffer("keys", torch.empty(memory_size, dim))
        self.register_buffer("values", torch.empty(memory_size, dim))
        self.register_buffer("write_pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("fill_count", torch.zeros((), dtype=torch.long))
        self._pending_sum: torch.Tensor | None = None  # [2 * dim + 1]: key sum, value sum, item count
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
        self._pending_sum, self.pending_writes = None, 0

    def queue_write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add the [B, d] write keys and values of one training batch to the pending write."""
        batch = torch.cat([keys.detach().sum(0), values.detach().sum(0), keys.new_tensor([keys.shape[0]])]).float()
        self._pending_sum = batch if self._pending_sum is None else self._pending_sum + batch
        self.pending_writes += 1

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
        count = float(pending[-1])
        if count == 0:
            return False
        key, value = pending[: self.dim] / count, pending[self.dim : 2 * self.dim] / count
        if not bool(torch.isfinite(pending).all()):
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

    def check_state(self, prefix: str = "") -> None:
        """Refuse a loaded bank that is not one this class could have written (shape, range, finiteness)."""
        where = f"{prefix}bank" if prefix else "bank"
        for name, tensor in (("keys", self.keys), ("values", self.values)):
            if tensor.dim() != 2 or tuple(tensor.shape) != (self.memory_size, self.dim):
                raise ValueError(f"{where}.{name} has shape {tuple(tensor.shape)}, expected "
                                 f"({self.memory_size}, {self.dim}) = (memory_size, hidden size).")
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{where}.{name} holds NaN or inf values: the saved memory is corrupted. Re-save "
                                 "the adapter from a healthy model, or call reset_memory() to start a fresh bank.")
        for name, tensor, high in (("write_pointer", self.write_pointer, self.memory_size - 1),
                                   ("fill_count", self.fill_count, self.memory_size)):
            if tensor.dim() != 0 or tensor.dtype.is_floating_point:
                raise ValueError(f"{where}.{name} must be an integer scalar, got shape {tuple(tensor.shape)} "
                                 f"dtype {tensor.dtype}.")
            if not 0 <= int(tensor) <= high:
                raise ValueError(f"{where}.{name} = {int(tensor)} is outside [0, {high}] for a bank of "
                                 f"{self.memory_size} slots: the saved memory is corrupted.")

    def extra_repr(self) -> str:
        return f"memory_size={self.memory_size}, dim={self.dim}"
