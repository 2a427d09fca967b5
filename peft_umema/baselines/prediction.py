"""The prediction loop every baseline shares: logits, labels and (optionally) head inputs over a DataLoader.

Batches are dicts with `labels` plus model inputs (`input_ids`, `attention_mask`, ...). Sequence tasks give logits
[N, C] and labels [N]; token tasks give [N, T, C] and [N, T], padded to the longest batch with label -100, so every
method returns probabilities aligned with `collect_labels(dataloader)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.utils import ModulesToSaveWrapper
from torch import nn

from ..constants import HEAD_MODULE_NAMES, IGNORE_INDEX

Batches = Iterable[Mapping[str, torch.Tensor]]


class ProbabilisticPredictor(Protocol):
    """What a driver needs from every baseline: probabilities aligned with `collect_labels(dataloader)`."""

    def predict_proba(self, model: nn.Module, dataloader: Batches) -> torch.Tensor: ...


@dataclass
class Collected:
    """Model outputs over a whole DataLoader, on the CPU."""

    logits: torch.Tensor
    labels: torch.Tensor
    features: torch.Tensor | None = None  # the classification head's inputs, [N, H] or [N, T, H]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def split_batch(batch: Mapping[str, torch.Tensor], device: torch.device) -> tuple[dict, torch.Tensor]:
    """Model inputs on `device` and the labels, kept apart so that the model does not compute a loss."""
    if not isinstance(batch, Mapping) or "labels" not in batch:
        raise ValueError("every batch must be a dict with `labels` and the model inputs (input_ids, attention_mask)")
    inputs = {
        name: value.to(device) if isinstance(value, torch.Tensor) else value
        for name, value in batch.items()
        if name != "labels"
    }
    return inputs, batch["labels"]


def active_dropout_layers(model: nn.Module) -> list[nn.Dropout]:
    """The dropout layers that would actually drop something (p > 0)."""
    return [module for module in model.modules() if isinstance(module, nn.Dropout) and module.p > 0]


@contextlib.contextmanager
def prediction_mode(model: nn.Module, keep_dropout: bool = False) -> Iterator[None]:
    """Eval mode, optionally with the dropout layers left on (MC dropout); restores every module's own flag."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    if keep_dropout:
        for module in active_dropout_layers(model):
            module.train()
    try:
        yield
    finally:
        for module, flag in flags.items():
            module.train(flag)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Fix the global RNG (dropout masks) inside a block without disturbing the caller's random stream."""
    if device.type == "cpu":
        forked = torch.random.fork_rng(devices=[])
    else:
        forked = torch.random.fork_rng(devices=[device], device_type=device.type)
    with forked:
        torch.manual_seed(seed)
        yield


def classification_head(model: nn.Module) -> nn.Linear:
    """The linear layer that produces the logits: `score` (GPT-2, Llama) or `classifier` (BERT).

    Under PEFT the head is a `ModulesToSaveWrapper`; the active adapter's trained copy is the one that runs.
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    head = next((getattr(base, name) for name in HEAD_MODULE_NAMES if isinstance(getattr(base, name, None), nn.Module)), None)
    if head is None:
        raise ValueError(f"{type(base).__name__} has no classification head named one of {HEAD_MODULE_NAMES}")
    if isinstance(head, ModulesToSaveWrapper):
        head = head.modules_to_save[head.active_adapters[0]] if head.active_adapters else head.original_module
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"the classification head of {type(base).__name__} is a {type(head).__name__}; "
            "this baseline needs a single nn.Linear head (as in GPT-2, Llama and BERT)"
        )
    return head


def collect_logits(
    model: nn.Module, dataloader: Batches, *, keep_dropout: bool = False, capture_features: bool = False
) -> Collected:
    """Run `model` over `dataloader` without gradients, in eval mode (dropout kept on if asked).

    With `capture_features`, also returns the classification head's inputs, taken by a forward hook; for decoder
    sequence classification, where the head runs on every token and HF keeps one token per row, the features of
    that kept token.
    """
    device = model_device(model)
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = None
    if capture_features:
        hook = classification_head(model).register_forward_hook(
            lambda _module, args, output: captured.append((args[0], output))
        )
    logits_parts, label_parts, feature_parts = [], [], []
    try:
        with prediction_mode(model, keep_dropout), torch.no_grad():
            for batch in dataloader:
                inputs, labels = split_batch(batch, device)
                logits = model(**inputs).logits
                _check_alignment(logits, labels)
                if capture_features:
                    feature_parts.append(_head_inputs_for_logits(captured, logits).float().cpu())
                    captured.clear()
                logits_parts.append(logits.float().cpu())
                label_parts.append(labels.cpu())
    finally:
        if hook is not None:
            hook.remove()
    if not logits_parts:
        raise ValueError("the dataloader yielded no batches")
    token_task = logits_parts[0].dim() == 3
    return Collected(
        logits=_concat_batches(logits_parts, token_task, 0.0),
        labels=_concat_batches(label_parts, token_task, IGNORE_INDEX),
        features=_concat_batches(feature_parts, token_task, 0.0) if capture_features else None,
    )


def collect_labels(dataloader: Batches) -> torch.Tensor:
    """The labels of `dataloader`, padded exactly as `collect_logits` pads them."""
    parts = [split_batch(batch, torch.device("cpu"))[1] for batch in dataloader]
    if not parts:
        raise ValueError("the dataloader yielded no batches")
    return _concat_batches(parts, parts[0].dim() == 2, IGNORE_INDEX)


def predict_proba(model: nn.Module, dataloader: Batches) -> torch.Tensor:
    """The plain (MAP) model's softmax probabilities, the reference every baseline is compared with."""
    return collect_logits(model, dataloader).logits.softmax(-1)


def labeled(values: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the positions that carry a label (drops -100 padding), flattening token tasks to one row per token."""
    if values.shape[: labels.dim()] != labels.shape:
        raise ValueError(f"values of shape {tuple(values.shape)} do not align with labels {tuple(labels.shape)}")
    keep = labels != IGNORE_INDEX
    if not keep.any():
        raise ValueError("no labeled positions: every label is -100")
    return values[keep], labels[keep]


def predict_with_weight_samples(
    model: nn.Module,
    dataloader: Batches,
    parameters: Mapping[str, nn.Parameter],
    samples: Iterable[Mapping[str, torch.Tensor]],
) -> torch.Tensor:
    """Probabilities [S, ...] with `parameters` set to each weight sample in turn, restored afterwards."""
    originals = {name: param.detach().clone() for name, param in parameters.items()}
    probs = []
    try:
        for sample in samples:
            with torch.no_grad():
                for name, param in parameters.items():
                    param.copy_(sample[name])
            probs.append(collect_logits(model, dataloader).logits.softmax(-1))
    finally:
        with torch.no_grad():
            for name, param in parameters.items():
                param.copy_(originals[name])
    return torch.stack(probs)


def adapter_parameter_groups(
    model: nn.Module, adapter_name: str | None = None
) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """One adapter's LoRA weights (`lora_A`, `lora_B`, ...) and its copy of the classification head, by name."""
    if not isinstance(model, PeftModel):
        raise TypeError(f"expected a peft PeftModel with LoRA adapters, got {type(model).__name__}")
    adapter_name = adapter_name or model.active_adapter
    if adapter_name not in model.peft_config:
        raise ValueError(f"adapter {adapter_name!r} not found; the model has {list(model.peft_config)}")
    lora, head = {}, {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        owners = {parts[i] for i in range(len(parts) - 1) if parts[i + 1] == adapter_name}
        if any(owner.startswith("lora_") for owner in owners):
            lora[name] = param
        elif "modules_to_save" in owners:
            head[name] = param
    if not lora:
        raise ValueError(f"adapter {adapter_name!r} has no LoRA parameters (names containing 'lora_')")
    return lora, head


@contextlib.contextmanager
def using_adapter(model: PeftModel, adapter_name: str) -> Iterator[None]:
    """Make `adapter_name` the active adapter inside a block; the previous one and all requires_grad flags return."""
    previous = model.active_adapter
    if adapter_name == previous:
        yield
        return
    if adapter_name not in model.peft_config:
        raise ValueError(f"adapter {adapter_name!r} not found; the model has {list(model.peft_config)}")
    grad_flags = {param: param.requires_grad for param in model.parameters()}
    model.set_adapter(adapter_name)
    try:
        yield
    finally:
        model.set_adapter(previous)
        for param, flag in grad_flags.items():
            param.requires_grad_(flag)


def _check_alignment(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() not in (2, 3) or logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} do not align with labels of shape {tuple(labels.shape)}; "
            "expected [B, C] with [B] (sequence) or [B, T, C] with [B, T] (token classification)"
        )


def _head_inputs_for_logits(captured: list[tuple[torch.Tensor, torch.Tensor]], logits: torch.Tensor) -> torch.Tensor:
    if len(captured) != 1:
        raise RuntimeError(f"the classification head ran {len(captured)} times in one forward pass, expected once")
    features, head_output = captured[0]
    if head_output.shape == logits.shape:
        return features
    if head_output.dim() == 3 and logits.dim() == 2:
        # the pooled logits are a copy of one row of head outputs, so matching them finds the kept token exactly
        hits = (head_output == logits[:, None, :]).all(-1)
        if not hits.any(-1).all():
            raise RuntimeError("could not find which token the model pooled for sequence classification")
        positions = torch.arange(hits.shape[1], device=hits.device)
        last_hit = (hits * positions).argmax(-1)
        return features[torch.arange(features.shape[0], device=features.device), last_hit]
    raise ValueError(
        f"cannot relate head outputs of shape {tuple(head_output.shape)} to logits of shape {tuple(logits.shape)}"
    )


def _concat_batches(parts: list[torch.Tensor], token_task: bool, pad_value: float) -> torch.Tensor:
    if not token_task:
        return torch.cat(parts)
    length = max(part.shape[1] for part in parts)
    return torch.cat(
        [F.pad(part, (0, 0) * (part.dim() - 2) + (0, length - part.shape[1]), value=pad_value) for part in parts]
    )
