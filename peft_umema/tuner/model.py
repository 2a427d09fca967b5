"""The UMEMA tuner: peft's LoRA plus, per adapter, an Uncertainty Modeling and an External Memory module.

peft's SEQ_CLS / TOKEN_CLS wrappers call the tuner's `forward`, so UM and EMA run there (as peft's AdaLoRA adds its
regulariser there): `forward.py` holds the per-call runtime, `attach.py` where each adapter's modules attach,
`checks.py` what loading and saving refuse. Each adapter owns its UM and EMA modules and its memory bank, all saved in
`adapter_model.safetensors`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Optional

import torch
import torch.distributed as dist
from peft import LoraConfig, LoraModel
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file
from torch import nn

from ..memory.augmentation import MemoryAugmentation
from ..uncertainty.estimator import UncertaintyEstimator
from .attach import resolve_attach_points
from .checks import MODULES_ATTR, check_finite_state, check_loaded_state
from .config import UMEMAConfig
from .forward import (
    CallState,
    TrainingLog,
    finish_outputs,
    hooks_for,
    joint_loss,
    queue_memory_write,
)
from .quantization import prepare_quantized_layers


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
                top_k=config.retrieval_top_k,
                reference_size=config.novelty_references,
            )
            if config.use_ema
            else None
        )
        self.register_buffer("task_id", torch.zeros((), dtype=torch.long))


class UMEMAModel(LoraModel):
    """
    LoRA with Uncertainty Modeling and External Memory Augmentation (Ma et al., PLOS ONE 2026).

    Created by `peft.get_peft_model(model, UMEMAConfig(...))` once `peft_umema` is imported. Outputs carry calibrated
    `logits` plus `confidence`, `aleatoric`, `epistemic` and `temperature` per example (SEQ_CLS) or per token
    (TOKEN_CLS); with `labels`, `loss` is the joint UMEMA objective.

    Training forward passes queue memory writes; `commit_memory()` writes them as one slot after the backward
    pass. `MemoryUpdateCallback` (added by `UMEMATrainer`) calls it after every optimizer step; custom loops call
    it after `optimizer.step()`. Eval-mode and no-grad forward passes never touch the bank.

    `merge_and_unload()` / `unload()` return the plain transformers model (LoRA merged or dropped, UM and EMA gone:
    they only run inside this tuner's forward); `merge_adapter()` merges LoRA in place and keeps UM and EMA.
    """

    # the memory bank lives on the tuner, not in the injected layers: transformers' bare `load_adapter` would drop it
    uses_shared_state = True

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None):
        self.__dict__["attach_points"] = {}
        self.__dict__["_umema_enabled"] = True
        self.__dict__["_call_recorders"] = []
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        self.training_log = TrainingLog()

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
        points = resolve_attach_points(model, config)
        if config.base_model_type is None:
            config.base_model_type = getattr(model.config, "model_type", None)
        prepare_quantized_layers(model)
        if MODULES_ATTR not in self._modules:
            self.umema_modules = nn.ModuleDict()
        super().inject_adapter(
            model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict,
        )
        modules = UMEMAModules(config, points.hidden_size)
        if not any(p.is_meta for p in modules.parameters()):  # meta under low_cpu_mem_usage: filled on load
            modules.to(next(model.get_submodule(points.head_name).parameters()).device)
        modules.requires_grad_(not config.inference_mode)
        self.umema_modules[adapter_name] = modules
        self.attach_points[adapter_name] = points

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
        self.attach_points.pop(adapter_name, None)

    def enable_adapter_layers(self) -> None:
        super().enable_adapter_layers()
        self._umema_enabled = True

    def disable_adapter_layers(self) -> None:
        super().disable_adapter_layers()
        self._umema_enabled = False

    @contextlib.contextmanager
    def umema_disabled(self):
        """Run LoRA alone (no UM, no EMA, no calibration) inside this block, e.g. to compare with the LoRA part."""
        previous = self._umema_enabled
        self._umema_enabled = False
        try:
            yield
        finally:
            self._umema_enabled = previous

    # ------------------------------------------------------------------------------------------------------------
    # forward: UM and EMA around the transformers model (see forward.py)
    # ------------------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        if kwargs.get("adapter_names") is not None:
            raise ValueError("UMEMA runs one adapter per batch; mixed-adapter batches (adapter_names=...) are not "
                             "supported. Call set_adapter(name) instead.")
        with super()._enable_peft_forward_hooks(*args, **kwargs):
            yield

    def forward(self, *args, **kwargs):
        if not self._umema_enabled:
            return super().forward(*args, **kwargs)
        name = self._single_active_adapter()
        labels = kwargs.pop("labels", None)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        inputs_embeds = kwargs.get("inputs_embeds")
        reference = input_ids if input_ids is not None else inputs_embeds
        if reference is None:
            raise ValueError("A UMEMA model needs input_ids or inputs_embeds.")
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(reference.shape[:2], dtype=torch.bool, device=reference.device)
        call = CallState(
            modules=self.umema_modules[name], config=self.peft_config[name], points=self.attach_points[name],
            mask=mask.bool(), input_ids=input_ids, inputs_embeds=inputs_embeds,
            training=self.model.training and torch.is_grad_enabled(),
        )
        with hooks_for(self.model, call):
            output = super().forward(*args, **kwargs)
        output = finish_outputs(call, output)
        terms = None
        if labels is not None:
            if not hasattr(output, "keys"):  # return_dict=False: a tuple whose first item is the logits
                terms = joint_loss(call, {"logits": output[0]}, labels, num_items_in_batch)
                output = (terms.loss,) + tuple(output)
            else:
                terms = joint_loss(call, output, labels, num_items_in_batch)
                output["loss"] = terms.loss
        if call.training:
            queue_memory_write(call)
            self.training_log.add(call, output, terms)
        for recorder in self._call_recorders:
            recorder.append(call)
        return output

    @contextlib.contextmanager
    def recording_calls(self):
        """Collect the `CallState` of every forward pass inside the block (for held-out fits of UM's outputs)."""
        calls: list[CallState] = []
        self._call_recorders.append(calls)
        try:
            yield calls
        finally:
            self._call_recorders.remove(calls)

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

    def commit_memory(self, adapter_name: Optional[str] = None, step: Optional[int] = None) -> int:
        """Write what training forward passes queued since the last commit as one FIFO slot per adapter. Call it
        after `optimizer.step()` in custom loops; returns the number of slots written. Under torch.distributed
        every rank must call it at the same step. A non-finite write raises (naming `step`) and writes nothing."""
        names = [adapter_name] if adapter_name else list(self.umema_modules)
        memories = [self.umema_modules[name].memory for name in names]
        return sum(memory.bank.commit(step) for memory in memories if memory is not None)

    def check_training_finite(self, step: Optional[int] = None) -> None:
        """Raise if a training loss since the last call was NaN or inf, before anything diverged is saved."""
        if self.training_log.diverged():
            for modules in self.umema_modules.values():
                if modules.memory is not None:
                    modules.memory.bank.discard_pending()
            where = f" at optimizer step {step}" if step is not None else ""
            raise FloatingPointError(
                f"Training diverged{where}: the loss became NaN or inf. Nothing was saved from this step on; lower the "
                "learning rate (or raise max_grad_norm clipping), check the data for empty rows, and restart."
            )

    @torch.no_grad()
    def refresh_novelty_references(self, batches, adapter_name: Optional[str] = None, seed: int = 0) -> int:
        """Set the bank's novelty references (the reference of `novelty`, hence of the memory part of `epistemic`)
        to the context summaries that the current model, in eval mode, gives a uniform random sample of `batches`
        (the training data; dicts of model inputs, `labels` ignored). Summaries taken during training mix every
        state the model passed through, and dropout: on MiniLM trained 3 epochs on SemEval, statistics gathered that
        way ranked 20 Newsgroups snippets as *more* familiar than SemEval sentences (docs/method.md, section 2).
        `MemoryUpdateCallback` calls it at the end of training; under torch.distributed every rank must call it (the
        samples of the ranks are merged, so every rank ends with the same references). Returns how many examples
        were seen."""
        name = adapter_name or self._single_active_adapter()
        memory = self._adapter_modules(name).memory
        if memory is None or memory.bank.reference_size == 0:
            return 0
        bank = memory.bank
        device = bank.references.device
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        generator = torch.Generator().manual_seed(seed + (dist.get_rank() if distributed else 0))
        # a uniform sample without replacement: keep the rows with the smallest random priorities
        kept = torch.empty(0, bank.dim, device=device)
        priorities = torch.empty(0, device=device)
        seen = 0
        was_training = self.training
        self.eval()
        try:
            with self.recording_calls() as calls:
                for batch in batches:
                    calls.clear()
                    inputs = {key: value.to(device) for key, value in batch.items() if key != "labels"}
                    self(**inputs)
                    summary = calls[-1].summary.float()
                    rows = inputs["attention_mask"].any(1) if "attention_mask" in inputs else None
                    if rows is not None:
                        summary = summary[rows]
                    seen += summary.shape[0]
                    kept = torch.cat([kept, summary])
                    priorities = torch.cat([priorities, torch.rand(summary.shape[0], generator=generator).to(device)])
                    kept, priorities = _smallest_priorities(kept, priorities, bank.reference_size)
        finally:
            self.train(was_training)
        if distributed:
            kept, priorities, seen = _merge_samples(kept, priorities, seen, bank.reference_size)
        bank.set_references(kept)
        return seen

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
        adapter_state = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        check_finite_state(adapter_state, "save")
        return adapter_state

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_loaded_state(model, config, adapter_name, remapped)
        return remapped

    def export_lora(self, output_dir: str, adapter_name: Optional[str] = None) -> str:
        """Save the LoRA part (and the classification head) as a plain peft LoRA adapter that loads without
        `peft_umema`. UM, EMA and the memory are not included, so its logits are the uncalibrated LoRA logits
        (without UM's `logit_scale`: same predictions, flatter probabilities)."""
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


def _merge_samples(kept: torch.Tensor, priorities: torch.Tensor, seen: int, size: int):
    """The `size` rows of smallest priority over all ranks (each rank passes its own sample), and the examples seen."""
    world = dist.get_world_size()
    padded = torch.zeros(size, kept.shape[1], device=kept.device)
    padded[: kept.shape[0]] = kept
    keys = torch.full((size,), float("inf"), device=kept.device)
    keys[: kept.shape[0]] = priorities
    rows = [torch.empty_like(padded) for _ in range(world)]
    all_keys = [torch.empty_like(keys) for _ in range(world)]
    dist.all_gather(rows, padded)
    dist.all_gather(all_keys, keys)
    counts = torch.tensor([seen], device=kept.device)
    dist.all_reduce(counts)
    rows, all_keys = torch.cat(rows), torch.cat(all_keys)
    finite = torch.isfinite(all_keys)  # padding rows carry an infinite priority
    return (*_smallest_priorities(rows[finite], all_keys[finite], size), int(counts))


def _smallest_priorities(rows: torch.Tensor, priorities: torch.Tensor, size: int):
    """The (at most) `size` rows of smallest random priority: a uniform sample without replacement."""
    if rows.shape[0] <= size:
        return rows, priorities
    order = priorities.topk(size, largest=False).indices
    return rows[order], priorities[order]
