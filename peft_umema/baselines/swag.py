"""LoRA-SWAG (Onal et al., 2024): SWA-Gaussian (Maddox et al., 2019) over the LoRA weights of one adapter.

Snapshots of the adapter's weights taken along the training trajectory give a running mean, a running (diagonal)
second moment and the last K deviations from the running mean; predictions average the model over weight samples

    theta = mean + sqrt(diag) / sqrt(2) * z1 + D z2 / sqrt(2 (K - 1)),   diag = second moment - mean^2,

with z1, z2 standard normal. MultiSWAG ensembles several such posteriors from differently seeded runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import PeftModel
from torch import nn
from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from .persistence import SafetensorsState, check_state_keys, check_state_shapes
from .prediction import (
    Batches,
    adapter_parameter_groups,
    predict_with_weight_samples,
    using_adapter,
)


class LoraSwag(SafetensorsState):
    """The SWAG posterior of one adapter's LoRA weights (and, with `include_head`, of its classification head).

    Built from a model only to learn the parameter names and shapes; `collect(model)` then records snapshots. When
    the head is excluded it is not sampled, but its value at the last snapshot is kept, so the state alone fixes the
    adapter's predictions; that is what lets MultiSWAG runs that reuse one adapter be ensembled afterwards.
    """

    def __init__(
        self,
        model: PeftModel,
        max_rank: int = 20,
        num_samples: int = 30,
        include_head: bool = False,
        adapter_name: str | None = None,
        seed: int = 0,
    ):
        if not isinstance(model, PeftModel):
            raise TypeError(f"LoRA-SWAG needs a peft PeftModel, got {type(model).__name__}")
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.max_rank = max_rank
        self.num_samples = num_samples
        self.include_head = include_head
        self.adapter_name = adapter_name or model.active_adapter
        self.seed = seed
        sampled, fixed = self._parameter_split(model)
        self.sampled_shapes = {name: param.shape for name, param in sampled.items()}
        self.fixed_shapes = {name: param.shape for name, param in fixed.items()}
        size = sum(shape.numel() for shape in self.sampled_shapes.values())
        self.num_snapshots = 0
        self.mean = torch.zeros(size)
        self.second_moment = torch.zeros(size)
        self.deviations = torch.zeros(0, size)  # [K, P], oldest first; rows are snapshot - running mean (after update)
        self.fixed_values: dict[str, torch.Tensor] = {}

    def collect(self, model: PeftModel) -> None:
        """Record the current weights as one more snapshot."""
        sampled, fixed = self._matching_parameters(model)
        snapshot = torch.cat([param.detach().float().cpu().flatten() for param in sampled.values()])
        count = self.num_snapshots
        self.mean = (self.mean * count + snapshot) / (count + 1)
        self.second_moment = (self.second_moment * count + snapshot**2) / (count + 1)
        self.deviations = torch.cat([self.deviations, (snapshot - self.mean)[None]])[-self.max_rank :]
        self.fixed_values = {name: param.detach().float().cpu().clone() for name, param in fixed.items()}
        self.num_snapshots = count + 1

    @property
    def variance(self) -> torch.Tensor:
        return (self.second_moment - self.mean**2).clamp_min(0.0)

    def sample(self, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One weight sample, by parameter name (fixed head values included)."""
        if self.num_snapshots == 0:
            raise RuntimeError("no SWAG snapshots yet: call collect() during training first")
        theta = self.mean + self.variance.sqrt() / 2**0.5 * torch.randn(self.mean.shape, generator=generator)
        rank = self.deviations.shape[0]
        if rank > 1:  # the low-rank term needs two deviations to estimate a covariance
            theta = theta + torch.randn(rank, generator=generator) @ self.deviations / (2 * (rank - 1)) ** 0.5
        return {**self._unflatten(theta), **self.fixed_values}

    def predict_samples(self, model: PeftModel, dataloader: Batches) -> torch.Tensor:
        """Probabilities under each of `num_samples` weight samples, [S, N, C] or [S, N, T, C]."""
        sampled, fixed = self._matching_parameters(model)
        generator = torch.Generator().manual_seed(self.seed)
        with using_adapter(model, self.adapter_name):
            samples = (self.sample(generator) for _ in range(self.num_samples))
            return predict_with_weight_samples(model, dataloader, {**sampled, **fixed}, samples)

    def predict_proba(self, model: PeftModel, dataloader: Batches) -> torch.Tensor:
        return self.predict_samples(model, dataloader).mean(0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Moments stored per parameter name, so that a state can be checked against a model's adapter on load."""
        state = {"num_snapshots": torch.tensor(self.num_snapshots)}
        rank = self.deviations.shape[0]
        mean, second_moment = self._unflatten(self.mean), self._unflatten(self.second_moment)
        deviations = self._unflatten(self.deviations, leading=(rank,))
        for name in self.sampled_shapes:
            state[f"mean.{name}"] = mean[name]
            state[f"second_moment.{name}"] = second_moment[name]
            state[f"deviations.{name}"] = deviations[name]
        state.update({f"fixed.{name}": value for name, value in self.fixed_values.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a saved state; it must come from the same adapter layout (names and shapes) as this object's model."""
        owner = f"{type(self).__name__} (adapter {self.adapter_name!r}, include_head={self.include_head})"
        snapshots = int(state["num_snapshots"]) if "num_snapshots" in state else 0
        expected = {"num_snapshots"}
        expected |= {
            f"{kind}.{name}" for kind in ("mean", "second_moment", "deviations") for name in self.sampled_shapes
        }
        expected |= {f"fixed.{name}" for name in self.fixed_shapes} if snapshots else set()
        check_state_keys(state, expected, owner)
        rank = state[f"deviations.{next(iter(self.sampled_shapes))}"].shape[0]
        if rank > self.max_rank:
            raise ValueError(f"the state holds {rank} deviations but this SWAG keeps at most max_rank={self.max_rank}")
        shapes = {}
        for name, shape in self.sampled_shapes.items():
            shapes.update({f"mean.{name}": shape, f"second_moment.{name}": shape})
            shapes[f"deviations.{name}"] = torch.Size([rank, *shape])
        shapes.update({f"fixed.{name}": shape for name, shape in self.fixed_shapes.items() if snapshots})
        check_state_shapes(state, shapes, owner)
        self.num_snapshots = snapshots
        self.mean = torch.cat([state[f"mean.{name}"].float().flatten() for name in self.sampled_shapes])
        self.second_moment = torch.cat(
            [state[f"second_moment.{name}"].float().flatten() for name in self.sampled_shapes]
        )
        self.deviations = torch.cat(
            [state[f"deviations.{name}"].float().reshape(rank, -1) for name in self.sampled_shapes], dim=1
        )
        self.fixed_values = {name: state[f"fixed.{name}"].float() for name in self.fixed_shapes if snapshots}

    def _parameter_split(self, model: PeftModel) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
        lora, head = adapter_parameter_groups(model, self.adapter_name)
        return ({**lora, **head}, {}) if self.include_head else (lora, head)

    def _matching_parameters(self, model: PeftModel) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
        sampled, fixed = self._parameter_split(model)
        found = {name: param.shape for name, param in {**sampled, **fixed}.items()}
        expected = {**self.sampled_shapes, **self.fixed_shapes}
        if found != expected:
            differing = sorted(name for name in found.keys() | expected.keys() if found.get(name) != expected.get(name))
            raise ValueError(
                f"the model's adapter {self.adapter_name!r} does not match this SWAG state; "
                f"parameters differing in name or shape: {differing[:5]}"
            )
        return sampled, fixed

    def _unflatten(self, flat: torch.Tensor, leading: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
        """Split the last dimension of `flat` back into the named parameters' shapes."""
        pieces = flat.split([shape.numel() for shape in self.sampled_shapes.values()], dim=-1)
        return {
            name: piece.reshape(*leading, *shape)
            for (name, shape), piece in zip(self.sampled_shapes.items(), pieces, strict=True)
        }


class MultiSwag:
    """MultiSWAG (Wilson & Izmailov, 2020): the average of several SWAG predictives from independent runs."""

    def __init__(self, swags: Sequence[LoraSwag]):
        if not swags:
            raise ValueError("MultiSWAG needs at least one SWAG run")
        self.swags = list(swags)

    def predict_samples(self, model: PeftModel, dataloader: Batches) -> torch.Tensor:
        """All runs' weight samples, concatenated along the first dimension."""
        return torch.cat([swag.predict_samples(model, dataloader) for swag in self.swags])

    def predict_proba(self, model: PeftModel, dataloader: Batches) -> torch.Tensor:
        """Each run's predictive, then their mean, so runs count equally whatever their `num_samples`."""
        return torch.stack([swag.predict_proba(model, dataloader) for swag in self.swags]).mean(0)


class SwagCallback(TrainerCallback):
    """Collects SWAG snapshots during `Trainer.train()`: every `every_n_steps` optimizer steps, or at each epoch end
    when `every_n_steps` is None, once `start_epoch` epochs (a float, as in `TrainerState.epoch`) have passed."""

    def __init__(self, swag: LoraSwag, start_epoch: float = 0.0, every_n_steps: int | None = None):
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive integer or None, got {every_n_steps}")
        if start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
        self.swag = swag
        self.start_epoch = start_epoch
        self.every_n_steps = every_n_steps

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.every_n_steps is not None and state.global_step % self.every_n_steps == 0:
            self._collect_if_started(state, kwargs["model"])

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.every_n_steps is None:
            self._collect_if_started(state, kwargs["model"])

    def _collect_if_started(self, state: TrainerState, model: nn.Module) -> None:
        if (state.epoch or 0.0) >= self.start_epoch:
            self.swag.collect(model)
