"""The UMEMA tuner: peft's LoRA plus, per adapter, an Uncertainty Modeling and an External Memory module.

`PeftModel.forward` calls the wrapped transformers model directly, so UM and EMA run from forward hooks on that
model: a pre-hook reads the attention mask and labels, hooks on the embeddings and the last blocks read X and H_l,
hooks around the classification head fuse the memory read into the head's input and divide its logits by the
temperature. transformers' own pooling and loss then see calibrated logits, and the model stays a standard
`AutoModelFor*` for the Trainer and pipelines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any, Optional

import torch
import torch.distributed as dist
from peft import LoraConfig, LoraModel
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file
from torch import nn

from ..memory.augmentation import MemoryAugmentation
from ..uncertainty.estimator import (
    UncertaintyEstimator,
    UncertaintyState,
    confidence_targets_loss,
    masked_mean,
)
from .attach import find_head_name, find_layer_list, hidden_size_of, is_causal_lm
from .config import UMEMAConfig

MODULES_ATTR = "umema_modules"
OUTPUT_FIELDS = ("confidence", "aleatoric", "epistemic", "temperature")


@functools.cache
def _output_class_with_uncertainty(output_cls: type) -> type:
    """A subclass of the model's output dataclass that declares our per-prediction fields, so DDP and other
    pytree-based wrappers can rebuild it (they call the class with its declared fields only)."""
    fields = [(name, Optional[torch.Tensor], dataclasses.field(default=None)) for name in OUTPUT_FIELDS]
    return dataclasses.make_dataclass(f"UMEMA{output_cls.__name__}", fields, bases=(output_cls,))


class UMEMAModules(nn.Module):
    """The UM and EMA modules of one adapter, plus the task id whose memory the bank holds."""

    def __init__(self, config: UMEMAConfig, hidden_size: int):
        super().__init__()
        token_level = getattr(config.task_type, "value", config.task_type) == "TOKEN_CLS"
        self.uncertainty = (
            UncertaintyEstimator(
                hidden_size=hidden_size,
                guidance_dim=config.guidance_dim or hidden_size,
                memory_dim=config.uncertainty_memory_dim,
                num_tasks=config.num_tasks,
                quantization_levels=config.quantization_levels,
                propagation_rank=config.propagation_rank,
                min_temperature=config.min_temperature,
                token_level=token_level,
            )
            if config.use_um
            else None
        )
        self.memory = (
            MemoryAugmentation(
                hidden_size=hidden_size,
                memory_size=config.memory_size,
                uncertainty_dim=config.uncertainty_memory_dim if config.use_um else 0,
                retrieval_temperature=config.retrieval_temperature,
                gate_bias_init=config.gate_bias_init,
                token_level=token_level,
            )
            if config.use_ema
            else None
        )
        self.register_buffer("task_id", torch.zeros((), dtype=torch.long))


class UMEMAModel(LoraModel):
    """
    LoRA with Uncertainty Modeling and External Memory Augmentation (Ma et al., PLOS ONE 2026).

    Created by `peft.get_peft_model(model, UMEMAConfig(...))` once `peft_umema` is imported. Each adapter owns its UM
    and EMA modules and its memory bank, all saved in `adapter_model.safetensors`. Outputs carry calibrated `logits`
    plus `confidence`, `aleatoric`, `epistemic` and `temperature` per example (SEQ_CLS) or per token (TOKEN_CLS).

    Training forward passes queue memory writes; `commit_memory()` writes them as one slot after the backward
    pass. `MemoryUpdateCallback` (added by `UMEMATrainer`) calls it after every optimizer step; custom loops call
    it after `optimizer.step()`. Eval-mode and no-grad forward passes never touch the bank.
    """

    # the memory bank lives on the tuner, not in the injected layers: transformers' bare `load_adapter` would drop it
    uses_shared_state = True

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None):
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        self.last_loss_terms: dict[str, float] = {}
        self.training_statistics = _RunningMeans()

    # ------------------------------------------------------------------------------------------------------------
    # adapter life cycle
    # ------------------------------------------------------------------------------------------------------------
    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        config = self.peft_config[adapter_name]
        head_name = find_head_name(model, config.head_module_name)
        self._check_label_count(model)
        if MODULES_ATTR not in self._modules:
            self.umema_modules = nn.ModuleDict()
            self.__dict__["_umema_hooks"] = _ForwardHooks(self)
        super().inject_adapter(
            model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict,
        )
        modules = UMEMAModules(config, hidden_size_of(model.config))
        if not any(p.is_meta for p in modules.parameters()):  # meta under low_cpu_mem_usage: filled on load
            modules.to(next(getattr(model, head_name).parameters()).device)
        modules.requires_grad_(not config.inference_mode)
        self.umema_modules[adapter_name] = modules
        self.__dict__["_umema_hooks"].attach(model, config, head_name)

    @staticmethod
    def _check_label_count(model: nn.Module) -> None:
        num_labels = getattr(model.config, "num_labels", None)
        if num_labels is None or num_labels < 2 or getattr(model.config, "problem_type", None) not in (
            None, "single_label_classification",
        ):
            raise ValueError(
                f"UMEMA calibrates single-label classifiers with >= 2 labels; this model has num_labels={num_labels}"
                f" and problem_type={getattr(model.config, 'problem_type', None)!r}. Load the backbone with "
                "num_labels=<number of classes> and no regression/multi-label problem_type."
            )

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        active = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name, modules in self.umema_modules.items():
            modules.requires_grad_(name in active and not inference_mode)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            self.umema_modules[name].requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        del self.umema_modules[adapter_name]

    def enable_adapter_layers(self) -> None:
        super().enable_adapter_layers()
        self._umema_hooks.enabled = True

    def disable_adapter_layers(self) -> None:
        super().disable_adapter_layers()
        self._umema_hooks.enabled = False

    @contextlib.contextmanager
    def umema_disabled(self):
        """Run LoRA alone (no UM, no EMA, no calibration) inside this block, e.g. to compare with the LoRA part."""
        previous = self._umema_hooks.bypass
        self._umema_hooks.bypass = True
        try:
            yield
        finally:
            self._umema_hooks.bypass = previous

    def _unload_and_optionally_merge(self, *args, **kwargs):
        """`merge_and_unload()` / `unload()` return a plain transformers model: LoRA merged (or dropped), UM and EMA
        removed with their hooks. Use `merge_adapter()` to merge LoRA in place and keep UM and EMA."""
        self._umema_hooks.detach()
        return super()._unload_and_optionally_merge(*args, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # memory bank
    # ------------------------------------------------------------------------------------------------------------
    def _adapter_modules(self, adapter_name: Optional[str]) -> UMEMAModules:
        name = adapter_name or self._single_active_adapter()
        if name not in self.umema_modules:
            raise ValueError(f"Unknown UMEMA adapter {name!r}; adapters: {list(self.umema_modules)}")
        return self.umema_modules[name]

    def _single_active_adapter(self) -> str:
        active = self.active_adapters
        if len(active) != 1:
            raise ValueError(f"UMEMA runs one adapter at a time, but {active} are active; call set_adapter(name).")
        return active[0]

    def commit_memory(self, adapter_name: Optional[str] = None) -> int:
        """Write what training forward passes queued since the last commit as one FIFO slot per adapter. Call it
        after `optimizer.step()` in custom loops; returns the number of slots written. Under torch.distributed
        every rank must call it at the same step."""
        names = [adapter_name] if adapter_name else list(self.umema_modules)
        memories = [self.umema_modules[name].memory for name in names]
        return sum(memory.bank.commit() for memory in memories if memory is not None)

    def reset_memory(self, adapter_name: Optional[str] = None) -> None:
        """A fresh Xavier-initialised bank (the paper re-initialises memory when a new task starts)."""
        memory = self._adapter_modules(adapter_name).memory
        if memory is not None:
            memory.bank.reset()

    def set_task(self, task_id: int, adapter_name: Optional[str] = None) -> bool:
        """Select the task embedding K_t; a task different from the bank's starts a fresh bank. Returns whether the
        task changed."""
        modules = self._adapter_modules(adapter_name)
        config = self.peft_config[adapter_name or self._single_active_adapter()]
        if not 0 <= task_id < config.num_tasks:
            raise ValueError(f"task_id={task_id} is outside [0, num_tasks={config.num_tasks}); raise "
                             "UMEMAConfig(num_tasks=...) to train more tasks.")
        if int(modules.task_id) == task_id:
            return False
        modules.task_id.fill_(task_id)
        if modules.memory is not None:
            modules.memory.bank.reset()
        return True

    def memory_stats(self, adapter_name: Optional[str] = None) -> dict[str, Any]:
        memory = self._adapter_modules(adapter_name).memory
        if memory is None:
            return {}
        bank = memory.bank
        return {
            "memory_fill": int(bank.fill_count) / bank.memory_size,
            "memory_write_pointer": int(bank.write_pointer),
            "memory_pending_writes": bank.pending_writes,
        }

    # ------------------------------------------------------------------------------------------------------------
    # state dict: UM/EMA keys are `umema_modules.<adapter>.<...>`; checkpoints drop the adapter name
    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        marker = f"{MODULES_ATTR}.{adapter_name}."
        if marker in key:
            return key.replace(marker, f"{MODULES_ATTR}.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        tuner = getattr(model, "base_model", model)
        if isinstance(tuner, UMEMAModel) and not (dist.is_available() and dist.is_initialized()):
            # a checkpoint taken right after a training step must not lose that step's memory write
            tuner.commit_memory(adapter_name)
        return super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        _check_loaded_state(model, config, adapter_name, remapped)
        return remapped

    def export_lora(self, output_dir: str, adapter_name: Optional[str] = None) -> str:
        """Save the LoRA part (and the classification head) as a plain peft LoRA adapter that loads without
        `peft_umema`. UM, EMA and the memory are not included, so its logits are the uncalibrated LoRA logits."""
        from peft.utils import get_peft_model_state_dict

        name = adapter_name or self._single_active_adapter()
        config = self.peft_config[name]
        state = get_peft_model_state_dict(self, adapter_name=name)
        state = {f"base_model.{k}": v.detach().cpu().contiguous() for k, v in state.items() if MODULES_ATTR not in k}
        lora_fields = {f for f in LoraConfig.__dataclass_fields__ if f not in ("peft_type",)}
        lora_config = LoraConfig(**{f: getattr(config, f) for f in lora_fields if f in config.__dict__})
        os.makedirs(output_dir, exist_ok=True)
        lora_config.save_pretrained(output_dir)
        save_file(state, os.path.join(output_dir, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
        return output_dir


def _check_loaded_state(model: nn.Module, config, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """peft reports only missing keys that contain `lora_`; check UM/EMA and head keys ourselves, with messages
    that name the mismatching quantity."""
    model_state = model.state_dict()
    marker = f"{MODULES_ATTR}.{adapter_name}."
    missing = [k for k in model_state if marker in k and k not in state_dict]
    if missing:
        raise ValueError(
            f"The adapter file for {adapter_name!r} lacks {len(missing)} UMEMA tensors (e.g. "
            f"{missing[0].split(marker, 1)[1]!r}): it is corrupted, truncated, or was saved without "
            f"use_um={config.use_um} / use_ema={config.use_ema}. Re-save it with save_pretrained()."
        )
    mismatches = [
        (key, tuple(tensor.shape), tuple(model_state[key].shape))
        for key, tensor in state_dict.items()
        if key in model_state and tuple(model_state[key].shape) != tuple(tensor.shape)
    ]
    # report the quantity a user can act on first: memory size, hidden size, label count, then anything else
    for key, saved, current in mismatches:
        if key.endswith(("bank.keys", "bank.values")):
            if saved[0] != current[0]:
                raise ValueError(f"Memory size mismatch: the adapter's bank has {saved[0]} slots, the config "
                                 f"asks for memory_size={current[0]}. Use the adapter's own adapter_config.json.")
            raise ValueError(f"Hidden size mismatch: the adapter's memory bank has hidden size {saved[1]}, the "
                             f"base model has {current[1]}. Load the adapter onto the base model it was trained on.")
    for key, saved, current in mismatches:
        if "modules_to_save" in key and saved[0] != current[0]:
            raise ValueError(f"Label count mismatch: the adapter's classification head has {saved[0]} labels, the "
                             f"base model has {current[0]}. Load the base model with num_labels={saved[0]}.")
    if mismatches:
        key, saved, current = mismatches[0]
        raise ValueError(f"Shape mismatch for {key}: the adapter has {saved}, the model has {current}. The adapter "
                         "was trained on a different base model or configuration.")


class _RunningMeans:
    """Means of per-position training outputs since the last `pop()`, for the training log."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, **values: torch.Tensor) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value.float().sum())
            self.counts[name] = self.counts.get(name, 0) + value.numel()

    def pop(self) -> dict[str, float]:
        means = {f"mean_{k}": self.sums[k] / max(self.counts[k], 1) for k in self.sums}
        self.sums, self.counts = {}, {}
        return means


class _ForwardHooks:
    """Per-call plumbing between the transformers model's forward and the active adapter's UM/EMA modules.

    Hook functions are closures (never bound methods) so peft's deepcopy of the head for `modules_to_save` cannot
    drag the tuner along, and each checks it fires on the module it was installed on.
    """

    def __init__(self, tuner: UMEMAModel):
        self.tuner = tuner
        self.enabled = True
        self.bypass = False
        self.handles: list = []
        self.hooked: dict[str, nn.Module] = {}
        self.model: Optional[nn.Module] = None
        self.head_name = ""
        self.call: dict[str, Any] = {}

    # -- installation -------------------------------------------------------------------------------------------------
    def attach(self, model: nn.Module, config: UMEMAConfig, head_name: str) -> None:
        if self.model is None:
            self.model = model
            self.head_name = head_name
            self.causal = is_causal_lm(model.config)
            self.pad_token_id = getattr(model.config, "pad_token_id", None)
            self.handles.append(model.register_forward_pre_hook(self._model_pre_hook(), with_kwargs=True))
            self.handles.append(model.register_forward_hook(self._model_post_hook(), with_kwargs=True))
        self.num_layers_needed = max(
            [max(c.propagation_layers, 1) for c in self.tuner.peft_config.values() if c.use_um] + [0]
        )
        self.layers = find_layer_list(model, config.layers_module_name)

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.hooked.clear()
        self.model = None

    def _refresh_module_hooks(self) -> None:
        """peft may wrap or replace the head and embeddings after injection; hook whatever is there now."""
        wanted = {"head": getattr(self.model, self.head_name)}
        if self.num_layers_needed:
            wanted["embeddings"] = self.model.get_input_embeddings()
            for i, block in enumerate(list(self.layers)[-self.num_layers_needed :]):
                wanted[f"block{i}"] = block
        if all(self.hooked.get(k) is m for k, m in wanted.items()) and len(self.hooked) == len(wanted):
            return
        for handle in self.handles[2:]:
            handle.remove()
        del self.handles[2:]
        self.hooked = wanted
        for key, module in wanted.items():
            if key == "head":
                self.handles.append(module.register_forward_pre_hook(self._head_pre_hook(module)))
                self.handles.append(module.register_forward_hook(self._head_post_hook(module)))
            else:
                self.handles.append(module.register_forward_hook(self._capture_hook(module, key)))

    # -- hooks ----------------------------------------------------------------------------------------------------------
    def _active(self) -> bool:
        return self.enabled and not self.bypass and self.model is not None

    def _model_pre_hook(self):
        def hook(module, args, kwargs):
            self.call = {}
            if not self._active():
                return None
            name = self.tuner._single_active_adapter()
            modules = self.tuner.umema_modules[name]
            self._refresh_module_hooks()
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            reference = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
            if mask is None:
                mask = torch.ones(reference.shape[:2], dtype=torch.bool, device=reference.device)
            self.call = {
                "adapter": name,
                "modules": modules,
                "config": self.tuner.peft_config[name],
                "input_ids": input_ids,
                "mask": mask.bool(),
                "labels": kwargs.get("labels"),
                "num_items_in_batch": kwargs.get("num_items_in_batch"),
                "inputs_embeds": kwargs.get("inputs_embeds"),
                "states": {},
            }
            return None

        return hook

    def _capture_hook(self, target: nn.Module, key: str):
        def hook(module, args, output):
            if module is target and self.call:
                self.call["states"][key] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def _head_pre_hook(self, target: nn.Module):
        def hook(module, args):
            if module is not target or not self.call or "head_done" in self.call:
                return None
            self.call["head_done"] = True
            return (self._augment(args[0]),) + tuple(args[1:])

        return hook

    def _head_post_hook(self, target: nn.Module):
        def hook(module, args, output):
            temperature = self.call.get("temperature") if module is target else None
            if temperature is None:
                return None
            shape = temperature.shape + (1,) * (output.dim() - temperature.dim())
            return output / temperature.reshape(shape).to(output.dtype)

        return hook

    def _model_post_hook(self):
        def hook(module, args, kwargs, output):
            call, self.call = self.call, {}
            if not call or "head_done" not in call or not hasattr(output, "keys"):
                return None
            if "uncertainty" in call:
                output = _output_class_with_uncertainty(type(output))(**output)
            self._attach_outputs(call, output)
            if call["labels"] is not None and output.get("loss") is not None:
                self._add_confidence_loss(call, output)
            if module.training and torch.is_grad_enabled():
                if "fused_summary" in call:
                    call["modules"].memory.queue_write(call["fused_summary"], call.get("uncertainty_memory"))
                if "confidence" in output:
                    valid = call["mask"] if output["confidence"].dim() == 2 else slice(None)
                    self.tuner.training_statistics.add(
                        confidence=output["confidence"].detach()[valid], temperature=output["temperature"].detach()[valid]
                    )
            return output

        return hook

    # -- UM + EMA around the head -------------------------------------------------------------------------------------
    def _pool_index(self) -> torch.Tensor:
        """The position transformers' decoder classifiers pool: the rightmost non-pad token."""
        input_ids, mask = self.call["input_ids"], self.call["mask"]
        tokens = (input_ids != self.pad_token_id) if (input_ids is not None and self.pad_token_id is not None) else mask
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return (positions * tokens.long()).argmax(-1)

    def _summary(self, hidden: torch.Tensor, pooling: str) -> torch.Tensor:
        if hidden.dim() == 2:
            return hidden
        if pooling == "last":
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), self._pool_index()]
        return masked_mean(hidden, self.call["mask"])

    def _augment(self, head_input: torch.Tensor) -> torch.Tensor:
        call, modules, config = self.call, self.call["modules"], self.call["config"]
        mask, states = call["mask"], call["states"]
        token_level = getattr(config.task_type, "value", config.task_type) == "TOKEN_CLS"
        pooling = config.context_pooling if config.context_pooling != "auto" else ("last" if self.causal else "mean")
        state: Optional[UncertaintyState] = None
        if modules.uncertainty is not None:
            embeddings = states.get("embeddings", call["inputs_embeds"])
            blocks = [states[k] for k in sorted((k for k in states if k.startswith("block")), key=lambda k: int(k[5:]))]
            task_ids = modules.task_id.expand(mask.shape[0])
            state = modules.uncertainty(embeddings, blocks[0], blocks[-config.propagation_layers :]
                                        if config.propagation_layers else [], mask, task_ids)
            call["uncertainty"] = state
            call["uncertainty_memory"] = state.memory
            call["temperature"] = modules.uncertainty.temperature(state)
        if modules.memory is None:
            return head_input
        dtype = modules.memory.query_proj.weight.dtype
        hidden = head_input.to(dtype)
        if hidden.dim() == 3:
            summary = self._summary(hidden, pooling)
        else:  # the model pooled already (e.g. BERT's pooler): summarise the last block's tokens
            last = states.get(f"block{self.num_layers_needed - 1}") if self.num_layers_needed else None
            summary = masked_mean(last.to(dtype), mask) if last is not None else hidden
        uncertainty_memory = state.memory if state is not None else None
        query = modules.memory.query(summary, uncertainty_memory)
        read, _ = modules.memory.retrieve(query, state.total if state is not None else None)
        fused = modules.memory.fuse(hidden, read, uncertainty_memory)
        if fused.dim() == 2:
            call["fused_summary"] = fused
        elif token_level:
            call["fused_summary"] = masked_mean(fused, mask)
        else:
            call["fused_summary"] = self._summary(fused, "last" if self.causal else pooling)
        return fused.to(head_input.dtype)

    def _attach_outputs(self, call: dict, output) -> None:
        state: Optional[UncertaintyState] = call.get("uncertainty")
        if state is None:
            return
        logits = output["logits"]
        if logits.dim() == 3:  # token task: per-token values
            values = (state.token_confidence, state.token_aleatoric, state.token_epistemic, call["temperature"])
        else:
            values = (state.sequence_confidence, state.aleatoric, state.epistemic, call["temperature"])
        confidence = call["modules"].uncertainty.reported_confidence(values[0], logits.detach())
        for name, value in zip(OUTPUT_FIELDS, (confidence,) + values[1:]):
            output[name] = value

    def _add_confidence_loss(self, call: dict, output) -> None:
        """loss = CE(calibrated logits) + lambda_c * BCE(confidence, correct), normalised like the CE term."""
        config, labels, logits = call["config"], call["labels"], output["logits"]
        task_loss = output["loss"]
        if "confidence" not in output or config.confidence_loss_weight == 0:
            self.tuner.last_loss_terms = {"task_loss": float(task_loss.detach())}
            return
        correct = (logits.detach().argmax(-1) == labels).float()
        valid = labels != -100
        total, count = confidence_targets_loss(output["confidence"], correct, valid)
        denominator = call["num_items_in_batch"] if call["num_items_in_batch"] is not None else count.clamp_min(1)
        confidence_loss = total / torch.as_tensor(denominator, device=total.device).to(total.dtype)
        output["loss"] = task_loss + config.confidence_loss_weight * confidence_loss
        self.tuner.last_loss_terms = {
            "task_loss": float(task_loss.detach()),
            "confidence_loss": float(confidence_loss.detach()),
        }
