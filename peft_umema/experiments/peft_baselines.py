"""PEFT baselines of the paper's main table that run on one machine, as registered methods.

- `adalora`: peft's AdaLoRA (SVD-shaped LoRA whose rank budget is reallocated by importance during training),
  started at rank 1.5 r and pruned to an average rank r, so its final budget matches LoRA's. The budget is
  reallocated over the first epoch and fixed from its last step on (AdaLoRA's final phase, `tfinal`, is the rest of
  the run): every epoch's checkpoint then has the same rank pattern, so the Trainer can reload the best one, as for
  every other method. The Trainer does not drive AdaLoRA's schedule itself: `AdaLoraBudgetCallback` calls
  `update_and_allocate` after every optimizer step, while the gradients are still there.

SplitLoRA (split learning: the client trains the first blocks' LoRA weights, the server the rest, exchanging
activations) and FLoRA (federated LoRA: clients train LoRA adapters, possibly of different ranks, that the server
stacks) change where LoRA is trained, not what is trained: on one machine with one client both reduce to LoRA on
the whole model, so the `lora` method stands for them.
"""

from __future__ import annotations

import math

import peft
import torch
from peft import AdaLoraConfig
from transformers import TrainerCallback

from .methods import LoRAMethod, RunSetup, lora_options, register_method


class AdaLoraBudgetCallback(TrainerCallback):
    """Runs AdaLoRA's importance-based rank allocation after each optimizer step (before the gradients are zeroed)."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        peft_model = getattr(model, "module", model)
        peft_model.base_model.update_and_allocate(state.global_step)


class AdaLoRAMethod(LoRAMethod):
    name = "adalora"
    description = "peft AdaLoRA: LoRA whose rank budget is pruned by importance to an average rank r during training"

    def peft_config(self, setup: RunSetup, model: torch.nn.Module) -> peft.PeftConfig:
        options = setup.options
        shared = lora_options(options, model)
        total_steps, first_epoch = _steps(setup)
        # The budget is allocated over the first epoch and fixed from its last step on, so that every checkpoint
        # (one per epoch) has the same rank pattern and the Trainer can load the best one back.
        budget_fixed_at = max(first_epoch - 1, 1)
        return AdaLoraConfig(
            task_type=setup.task_type,
            init_r=max(options.rank + options.rank // 2, options.rank + 1),
            target_r=options.rank,
            lora_alpha=shared["lora_alpha"],
            lora_dropout=shared["lora_dropout"],
            target_modules=shared["target_modules"],
            modules_to_save=shared.get("modules_to_save"),
            total_step=max(total_steps, budget_fixed_at + 1),
            tinit=int(0.2 * budget_fixed_at),
            tfinal=max(total_steps, budget_fixed_at + 1) - budget_fixed_at,
            deltaT=1,
        )

    def fit(self, setup: RunSetup):
        trainer_class = self.trainer_class

        def trainer_with_budget(*args, callbacks=None, **kwargs):
            return trainer_class(*args, callbacks=[*(callbacks or []), AdaLoraBudgetCallback()], **kwargs)

        fitting = AdaLoRAMethod.__new__(AdaLoRAMethod)
        fitting.trainer_class = trainer_with_budget
        return LoRAMethod.fit(fitting, setup)


def _steps(setup: RunSetup) -> tuple[int, int]:
    """(optimizer steps of the whole run, steps of the first epoch), as the Trainer will count them."""
    options = setup.options
    per_epoch = math.ceil(len(setup.train_dataset) / options.batch_size)
    total = options.max_steps if options.max_steps > 0 else per_epoch * math.ceil(options.epochs)
    return total, min(per_epoch, total)


register_method(AdaLoRAMethod())
