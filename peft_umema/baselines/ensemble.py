"""Deep ensembles of LoRA adapters (Lakshminarayanan et al., 2017) sharing one frozen base model.

Each member is a peft adapter on the same `PeftModel`, so M members cost M adapters, not M backbones. Members are
trained one after another (`model.set_adapter(name)` then train), and predictions average their softmax outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import LoraConfig, PeftModel

from .prediction import Batches, collect_logits, model_device, seeded, using_adapter


def add_ensemble_members(
    model: PeftModel, lora_config: LoraConfig, num_members: int, seed: int = 0, name_prefix: str = "member_"
) -> list[str]:
    """Add `num_members` fresh LoRA adapters, member i initialised under seed `seed + i`; returns their names.

    The seed only changes LoRA's random init (lora_B starts at zero); the rest of the members' diversity comes from
    the data order and dropout of their separate training runs, which the caller seeds the same way.
    """
    if not isinstance(model, PeftModel):
        raise TypeError(f"expected a peft PeftModel, got {type(model).__name__}")
    if num_members < 1:
        raise ValueError(f"num_members must be >= 1, got {num_members}")
    names = [f"{name_prefix}{index}" for index in range(num_members)]
    taken = [name for name in names if name in model.peft_config]
    if taken:
        raise ValueError(f"adapters {taken} already exist; choose another name_prefix")
    for index, name in enumerate(names):
        with seeded(seed + index, model_device(model)):
            model.add_adapter(name, lora_config)
    return names


class LoraEnsemble:
    """Mean of the softmax outputs of several adapters of one `PeftModel`."""

    def __init__(self, adapter_names: Sequence[str]):
        if not adapter_names:
            raise ValueError("an ensemble needs at least one adapter name")
        if len(set(adapter_names)) != len(adapter_names):
            raise ValueError(f"adapter names repeat: {list(adapter_names)}")
        self.adapter_names = list(adapter_names)

    def predict_samples(self, model: PeftModel, dataloader: Batches) -> torch.Tensor:
        """Each member's probabilities, [M, N, C] or [M, N, T, C]; the active adapter is restored afterwards."""
        if not isinstance(model, PeftModel):
            raise TypeError(f"expected a peft PeftModel, got {type(model).__name__}")
        missing = [name for name in self.adapter_names if name not in model.peft_config]
        if missing:
            raise ValueError(f"adapters {missing} not found; the model has {list(model.peft_config)}")
        members = []
        for name in self.adapter_names:
            with using_adapter(model, name):
                members.append(collect_logits(model, dataloader).logits.softmax(-1))
        return torch.stack(members)

    def predict_proba(self, model: PeftModel, dataloader: Batches) -> torch.Tensor:
        return self.predict_samples(model, dataloader).mean(0)
