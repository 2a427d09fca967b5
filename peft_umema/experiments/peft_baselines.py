"""PEFT baselines of the paper's main table that run on one machine, as registered methods.

- `adalora`: peft's AdaLoRA (SVD-shaped LoRA whose rank budget is reallocated by importance during training),
  started at rank 1.5 r and pruned to an average rank r, so its final budget matches LoRA's. The budget is
  reallocated over the first epoch and fixed from its last step on (AdaLoRA's final phase, `tfinal`, is the rest of
  the run): every epoch's checkpoint then has the same rank pattern, so the Trainer can reload the best one, as for
  every other method. The Trainer does not drive AdaLoRA's schedule itself: `AdaLoraBudgetCallback` calls
  `update_and_allocate` after every optimizer step, while the gradients are still there.
- `lisa`: LISA (`baselines.lisa`), full fine-tuning of everything outside the transformer blocks plus `active_layers`
  blocks at a time, resampled every `interval` optimizer steps, at the run's learning rate times
  `learning_rate_scale`. Saves every weight (`lisa_model.safetensors`).
- `mixlora`: a MixLoRA-style mixture of LoRA experts (`baselines.mixlora`) on LoRA's target layers, with LoRA's
  rank, alpha and dropout, `top_k` of `num_experts` experts routed per token and a load-balancing loss weighted by
  `aux_loss_coefficient`; the head (and a BERT-style pooler) trains in full as under LoRA. Saves the trained
  tensors only (`mixlora_adapter.safetensors`).

LISA and MixLoRA are no peft adapters: they train with the same Trainer arguments as `lora`, save what they trained
as one safetensors file (loaded back strictly onto a freshly loaded backbone) and their options and seed as every
baseline does, and take options like the uncertainty baselines (`configured_method("lisa", {"active_layers": 4})`).

SplitLoRA and FLoRA have no single-machine form of their own: `SPLIT_AND_FEDERATED_LORA` says why `lora` stands
for them (the report prints it under the main study).
"""

from __future__ import annotations

import dataclasses
import math
from abc import abstractmethod
from pathlib import Path

import peft
import torch
from peft import AdaLoraConfig
from torch import nn
from transformers import Trainer, TrainerCallback, set_seed

from ..baselines.lisa import LISACallback, parameter_count, trainable_at_once
from ..baselines.mixlora import MixLoRATrainer, add_mixlora_experts
from ..baselines.persistence import (
    SafetensorsState,
    check_state_keys,
    check_state_shapes,
)
from ..baselines.prediction import predict_proba
from ..tuner.attach import find_head_name, find_layer_list
from .backbones import load_backbone
from .baseline_methods import (
    BaselineFitted,
    BaselineMethod,
    _check_positive_integers,
)
from .checks import REPORT_FIXES
from .methods import (
    LoRAMethod,
    RunSetup,
    TrainOptions,
    lora_options,
    register_method,
    trainer_arguments,
)


SPLIT_AND_FEDERATED_LORA = (
    "SplitLoRA (split learning: a client trains the first blocks' LoRA weights, a server the rest, exchanging "
    "activations) and FLoRA (federated LoRA: clients train LoRA adapters, possibly of different ranks, that a server "
    "stacks) change where LoRA is trained, not what is trained: on one machine with one client both are LoRA on the "
    "whole model, so the LoRA row stands for them.")


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


# ----------------------------------------------------------------------------------------------------------------
# LISA and MixLoRA: trained outside peft
# ----------------------------------------------------------------------------------------------------------------


def _check_finite_number(options, name: str, *, positive: bool) -> None:
    value = getattr(options, name)
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
            or (positive and value == 0)):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class LISAOptions:
    """`active_layers` blocks train at a time, resampled every `interval` optimizer steps, at the run's learning
    rate times `learning_rate_scale`.

    Full-weight updates need smaller steps than LoRA's, and LISA's own recipes use a much smaller learning rate for
    full weights than for LoRA; the scale 0.1 is our choice in that direction, not a value measured here.
    """

    active_layers: int = 2
    interval: int = 20
    learning_rate_scale: float = 0.1

    def __post_init__(self):
        _check_positive_integers(self, "active_layers", "interval")
        _check_finite_number(self, "learning_rate_scale", positive=True)


@dataclasses.dataclass(frozen=True)
class MixLoRAOptions:
    """`num_experts` LoRA experts on every target layer, `top_k` of them per token, the load-balancing loss weighted
    by `aux_loss_coefficient`. `rank` and `target_modules` are the experts' LoRA settings: None takes the run's own
    (`TrainOptions`), and a fit records the values it used, so that its run folder rebuilds the same experts."""

    num_experts: int = 4
    top_k: int = 2
    aux_loss_coefficient: float = 0.01
    rank: int | None = None
    target_modules: str | list[str] | None = None

    def __post_init__(self):
        _check_positive_integers(self, "num_experts", "top_k")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k must be at most num_experts ({self.num_experts}), got {self.top_k!r}.")
        _check_finite_number(self, "aux_loss_coefficient", positive=False)
        given = {name: getattr(self, name) for name in ("rank", "target_modules") if getattr(self, name) is not None}
        TrainOptions(**given)  # checks them as the run's own LoRA settings are checked

    def for_run(self, options: TrainOptions) -> MixLoRAOptions:
        """These options with `rank` and `target_modules` taken from the run where they are None."""
        return dataclasses.replace(
            self, rank=self.rank or options.rank, target_modules=self.target_modules or options.target_modules
        )


class TrainedWeights(SafetensorsState):
    """The parameters a baseline trained, by name. Loading takes exactly these names and shapes, or fails naming the
    file and what does not match."""

    def __init__(self, parameters: dict[str, nn.Parameter]):
        self.parameters = parameters

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.parameters)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        owner = type(self).__name__
        check_state_keys(state, set(self.parameters), owner)
        check_state_shapes(state, {name: parameter.shape for name, parameter in self.parameters.items()}, owner)
        with torch.no_grad():
            for name, parameter in self.parameters.items():
                parameter.copy_(state[name])

    def load(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: it holds the trained weights of the run; {REPORT_FIXES}.")
        try:
            super().load(path)
        except ValueError as error:
            raise ValueError(f"{path} does not fit the model rebuilt for it ({error}); {REPORT_FIXES}.") from None


class WeightsFileMethod(BaselineMethod):
    """A PEFT baseline that is no peft adapter. It trains with the Trainer arguments of `lora` (dev selection and
    early stopping included) and saves what it trained as one safetensors file, `<weights_name>.safetensors` (its
    `TrainedWeights` state), beside the options and seed every baseline saves. The backbone loads in full precision:
    the Trainer fine-tunes 4/8-bit backbones through peft adapters only.
    """

    weights_name: str

    @abstractmethod
    def new_trainer(self, model: nn.Module, setup: RunSetup, options) -> Trainer:
        """The Trainer that fits `model` on `setup`."""

    @abstractmethod
    def trained_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """What the method trains, by name: the contents of its weights file."""

    def run_options(self, setup: RunSetup):
        """The options a fit on `setup` uses and records."""
        return self.options

    def prepared(self, model: nn.Module, options) -> nn.Module:
        """The backbone as this method trains it, built the same way to fit and to load."""
        return model

    def fit(self, setup: RunSetup) -> BaselineFitted:
        if setup.options.quantization:
            raise ValueError(
                f"{self.name} trains without peft adapters, and the Trainer fine-tunes a 4/8-bit backbone through "
                "peft adapters only; run it without load_in_4bit/load_in_8bit."
            )
        set_seed(setup.seed)
        options = self.run_options(setup)
        model = self.prepared(_backbone(setup.backbone, setup.task_type, setup.label_names), options)
        trainer = self.new_trainer(model, setup, options)
        trainer.train()
        return BaselineFitted(
            model=model, log_history=list(trainer.state.log_history), options=options, seed=setup.seed,
            states=self.new_states(model, options, setup.seed),
        )

    def load_model(self, output_dir: Path, run_info: dict, options) -> nn.Module:
        backbone = _backbone(run_info["backbone"], run_info["task_type"], run_info["label_names"])
        return self.prepared(backbone, options).eval()

    def new_states(self, model, options, seed):
        return {self.weights_name: TrainedWeights(self.trained_parameters(model))}

    def predict_outputs(self, fitted, batches):
        return {"probs": predict_proba(fitted.model, batches)}

    def save(self, fitted: BaselineFitted, output_dir: Path) -> None:
        self.save_states(fitted, output_dir)  # no peft adapter: the weights file is one of the states


def _backbone(backbone: str, task_type: str, label_names: list[str]) -> nn.Module:
    return load_backbone(backbone, task_type, len(label_names), id2label=label_names)[0]


class LISAMethod(WeightsFileMethod):
    name = "lisa"
    description = (
        "LISA: full fine-tuning of all but the transformer blocks plus `active_layers` blocks at a time, resampled "
        "every `interval` steps"
    )
    options_class = LISAOptions
    weights_name = "lisa_model"

    def new_trainer(self, model, setup, options: LISAOptions):
        run = setup.options
        scaled = dataclasses.replace(run, learning_rate=run.learning_rate * options.learning_rate_scale)
        trainer = Trainer(**trainer_arguments(model, dataclasses.replace(setup, options=scaled)))
        _, blocks = find_layer_list(model, None)
        trainer.add_callback(LISACallback(blocks, options.active_layers, options.interval, setup.seed))
        return trainer

    def trained_parameters(self, model):
        return dict(model.named_parameters())  # every weight (tied ones once)

    def parameter_counts(self, fitted):
        """(parameters that train at one time, all parameters)."""
        _, blocks = find_layer_list(fitted.model, None)
        return trainable_at_once(fitted.model, blocks, fitted.options.active_layers), parameter_count(fitted.model)


class MixLoRAMethod(WeightsFileMethod):
    name = "mixlora"
    description = (
        "MixLoRA-style mixture of `num_experts` LoRA experts on each LoRA target layer, `top_k` routed per token, "
        "with a load-balancing loss"
    )
    options_class = MixLoRAOptions
    weights_name = "mixlora_adapter"

    def run_options(self, setup):
        return self.options.for_run(setup.options)

    def prepared(self, model, options: MixLoRAOptions):
        settings = lora_options(TrainOptions(rank=options.rank, target_modules=options.target_modules), model)
        return add_mixlora_experts(
            model, settings["target_modules"], [find_head_name(model, None), *settings.get("modules_to_save", [])],
            rank=settings["r"], alpha=settings["lora_alpha"], dropout=settings["lora_dropout"],
            num_experts=options.num_experts, top_k=options.top_k,
        )

    def new_trainer(self, model, setup, options: MixLoRAOptions):
        return MixLoRATrainer(aux_loss_coefficient=options.aux_loss_coefficient, **trainer_arguments(model, setup))

    def trained_parameters(self, model):
        return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}

    def parameter_counts(self, fitted):
        trainable = sum(parameter.numel() for parameter in self.trained_parameters(fitted.model).values())
        return trainable, parameter_count(fitted.model)


register_method(LISAMethod())
register_method(MixLoRAMethod())
