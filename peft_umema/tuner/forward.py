"""The per-call UM/EMA runtime: what one forward pass of a UMEMA model does around the transformers model.

`UMEMAModel.forward` (the tuner's forward, which peft's SEQ_CLS / TOKEN_CLS wrappers call) builds a `CallState`,
registers hooks for the duration of the call only (so nothing outlives it and `copy.deepcopy` copies no hook), runs
the transformers model without `labels`, then finishes the outputs and computes the joint loss once:

1. capture hooks read X (input embeddings) and H_l (the last P blocks) of this adapter's attach points;
2. a pre-hook on the classification head runs UM on them, reads the memory (EMA) and fuses it into the head input;
3. a hook after the head divides its logits by UM's temperature, so transformers' own pooling sees calibrated logits;
4. `finish_outputs` adds confidence / aleatoric / epistemic / temperature to the output, the loss
   [sum CE(calibrated logits, y) + lambda_c * sum BCE(confidence, prediction is right)] / N
   (N = `num_items_in_batch` from the Trainer, else the labelled items of this batch), and in training queues the
   memory write and the log statistics (as tensors: nothing is synced to the host here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..constants import IGNORE_INDEX, TOKEN_CLS, UNCERTAINTY_OUTPUT_FIELDS
from ..uncertainty.estimator import (
    UncertaintyState,
    confidence_targets_loss,
    masked_mean,
)
from .attach import AttachPoints


@dataclasses.dataclass
class CallState:
    """Everything one forward pass of one adapter needs and produces; lives for that call only."""

    modules: nn.Module  # the adapter's UMEMAModules
    config: object  # the adapter's UMEMAConfig
    points: AttachPoints
    mask: torch.Tensor  # [B, T] bool attention mask
    input_ids: Optional[torch.Tensor]
    inputs_embeds: Optional[torch.Tensor]
    embeddings: Optional[torch.Tensor] = None  # X, captured from the input embeddings
    blocks: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # index among the last blocks -> H
    head_done: bool = False
    uncertainty: Optional[UncertaintyState] = None
    um_temperature: Optional[torch.Tensor] = None  # T_UM from M_U, [B] or [B, T]
    temperature: Optional[torch.Tensor] = None  # the temperature applied (T_UM, or the held-out fit of it)
    novelty: Optional[torch.Tensor] = None  # [B]: how unlike the memory's training references the input is (eval)
    raw_logits: Optional[torch.Tensor] = None  # uncalibrated logits at the scored positions
    fused_summary: Optional[torch.Tensor] = None  # [B, d]: what this batch writes into the memory
    summary: Optional[torch.Tensor] = None  # [B, d]: the context summaries c (the novelty compares them)
    training: bool = False

    @property
    def token_level(self) -> bool:
        return getattr(self.config.task_type, "value", self.config.task_type) == TOKEN_CLS

    @property
    def pooling(self) -> str:
        if self.config.context_pooling != "auto":
            return self.config.context_pooling
        return "last" if self.points.causal else "mean"


@functools.cache
def output_class_with_uncertainty(output_cls: type) -> type:
    """A subclass of the model's output dataclass that declares our per-prediction fields, so DDP and other
    pytree-based wrappers can rebuild it (they call the class with its declared fields only)."""
    fields = [(name, Optional[torch.Tensor], dataclasses.field(default=None)) for name in UNCERTAINTY_OUTPUT_FIELDS]
    return dataclasses.make_dataclass(f"UMEMA{output_cls.__name__}", fields, bases=(output_cls,))


# ------------------------------------------------------------------------------------------------------------------
# hooks: module-level functions bound to one CallState with functools.partial, registered for one call
# ------------------------------------------------------------------------------------------------------------------


def _first_tensor(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _capture_embeddings(call: CallState, module, args, output) -> None:
    if call.embeddings is None:
        call.embeddings = _first_tensor(output)


def _capture_block(call: CallState, index: int, module, args, output) -> None:
    call.blocks.setdefault(index, _first_tensor(output))


def _augment_head_input(call: CallState, module, args):
    if call.head_done:  # a head called twice in one forward is augmented once
        return None
    call.head_done = True
    return (augment(call, args[0]),) + tuple(args[1:])


def _calibrate_head_output(call: CallState, module, args, output):
    if call.um_temperature is None:
        return None
    if call.config.logit_scale != 1:
        output = output * call.config.logit_scale
    decoder_sequence = output.dim() == 3 and not call.token_level  # logits at every position, pooled later
    call.raw_logits = output[torch.arange(output.shape[0], device=output.device), _pool_index(call)] \
        if decoder_sequence else output
    temperature = call.um_temperature
    calibrator = call.modules.uncertainty.calibrator
    if calibrator.is_fitted:
        temperature = calibrator(calibration_features(call), temperature)
    call.temperature = temperature
    temperature = temperature.reshape(temperature.shape + (1,) * (output.dim() - temperature.dim()))
    return output / temperature.to(output.dtype)


def calibration_features(call: CallState) -> torch.Tensor:
    """The held-out temperature fit's inputs per scored position ([B, F] or [B, T, F]; see calibrator.py)."""
    state = call.uncertainty
    novelty = call.novelty if call.novelty is not None else torch.zeros(call.mask.shape[0], device=call.mask.device)
    if call.token_level:
        length = call.mask.shape[1]
        return call.modules.uncertainty.calibrator.features(
            state.memory.unsqueeze(1).expand(-1, length, -1), state.token_aleatoric, state.token_epistemic,
            novelty.unsqueeze(1).expand(-1, length), call.raw_logits,
        )
    return call.modules.uncertainty.calibrator.features(
        state.memory, state.aleatoric, state.epistemic, novelty, call.raw_logits
    )


@contextlib.contextmanager
def hooks_for(model: nn.Module, call: CallState):
    """Install the capture and head hooks of `call` on `model` for the duration of the block."""
    handles = []
    try:
        if call.points.blocks_needed:
            embeddings = model.get_input_embeddings()
            handles.append(embeddings.register_forward_hook(functools.partial(_capture_embeddings, call)))
            for index, name in enumerate(call.points.block_names()):
                block = model.get_submodule(name)
                handles.append(block.register_forward_hook(functools.partial(_capture_block, call, index)))
        head = model.get_submodule(call.points.head_name)
        handles.append(head.register_forward_pre_hook(functools.partial(_augment_head_input, call)))
        handles.append(head.register_forward_hook(functools.partial(_calibrate_head_output, call)))
        yield
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------------------------------------
# UM + EMA around the head
# ------------------------------------------------------------------------------------------------------------------


def _pool_index(call: CallState) -> torch.Tensor:
    """The position transformers' decoder classifiers pool: the rightmost non-pad token."""
    input_ids, pad = call.input_ids, call.points.pad_token_id
    tokens = (input_ids != pad) if (input_ids is not None and pad is not None) else call.mask
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    return (positions * tokens.long()).argmax(-1)


def _summary(call: CallState, hidden: torch.Tensor, pooling: str) -> torch.Tensor:
    if hidden.dim() == 2:
        return hidden
    if pooling == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), _pool_index(call)]
    return masked_mean(hidden, call.mask)


def augment(call: CallState, head_input: torch.Tensor) -> torch.Tensor:
    """Run UM on the captured states, then read the memory and fuse it into the head input (EMA)."""
    modules, config, mask = call.modules, call.config, call.mask
    state: Optional[UncertaintyState] = None
    if modules.uncertainty is not None:
        embeddings = call.embeddings if call.embeddings is not None else call.inputs_embeds
        blocks = [call.blocks[index] for index in sorted(call.blocks)]
        if embeddings is None or len(blocks) != call.points.blocks_needed:
            raise RuntimeError(
                "UMEMA could not read the backbone's embeddings and last blocks in this forward pass; set "
                "UMEMAConfig(layers_module_name=...) to the ModuleList of transformer blocks."
            )
        task_ids = modules.task_id.expand(mask.shape[0])
        propagated = blocks[-config.propagation_layers:] if config.propagation_layers else []
        state = modules.uncertainty(embeddings, blocks[0], propagated, mask, task_ids)
        call.uncertainty = state
        temperature = modules.uncertainty.temperature(state)
        if call.training and config.temperature_training == "detached":
            # the loss sees logits / T, but T gets a zero gradient: it is fitted on held-out data instead
            temperature = temperature.detach() + 0.0 * temperature
        call.um_temperature = temperature
    memory = modules.memory
    if memory is None:
        return head_input
    dtype = memory.query_proj.weight.dtype
    hidden = head_input.to(dtype)
    if hidden.dim() == 3:
        summary = _summary(call, hidden, call.pooling)
    elif call.blocks:  # the model pooled already (e.g. BERT's pooler): summarise the last block's tokens
        summary = masked_mean(call.blocks[max(call.blocks)].to(dtype), mask)
    else:
        summary = hidden
    uncertainty_memory = state.memory if state is not None else None
    query = memory.query(summary, uncertainty_memory)
    call.summary = summary
    if not call.training:
        call.novelty = memory.bank.novelty(summary)
    read, _ = memory.retrieve(query, state.total if state is not None else None)
    fused = memory.fuse(hidden, read, uncertainty_memory)
    if fused.dim() == 2:
        call.fused_summary = fused
    elif call.token_level:
        call.fused_summary = masked_mean(fused, mask)
    else:
        call.fused_summary = _summary(call, fused, "last" if call.points.causal else call.pooling)
    return fused.to(head_input.dtype)


# ------------------------------------------------------------------------------------------------------------------
# outputs, loss, training bookkeeping
# ------------------------------------------------------------------------------------------------------------------


def finish_outputs(call: CallState, output):
    """The model output with UM's fields added (when UM ran)."""
    state = call.uncertainty
    if state is None or not hasattr(output, "keys"):
        return output
    output = output_class_with_uncertainty(type(output))(**output)
    logits = output["logits"]
    if logits.dim() == 3:  # token task: per-token values
        values = (state.token_confidence, state.token_aleatoric, state.token_epistemic, call.temperature)
    else:
        values = (state.sequence_confidence, state.aleatoric, state.epistemic, call.temperature)
    confidence = call.modules.uncertainty.reported_confidence(values[0], logits.detach(), call.novelty)
    epistemic = values[2]
    if call.novelty is not None and call.config.epistemic_from_memory:
        epistemic = epistemic + (call.novelty.unsqueeze(-1) if epistemic.dim() == 2 else call.novelty)
    values = (values[0], values[1], epistemic, values[3])
    for name, value in zip(UNCERTAINTY_OUTPUT_FIELDS, (confidence,) + values[1:]):
        output[name] = value
    return output


@dataclasses.dataclass
class LossTerms:
    """The joint objective of one batch, normalised by N, and its summed parts (for the training log)."""

    loss: torch.Tensor
    task_sum: torch.Tensor
    confidence_sum: torch.Tensor
    items: torch.Tensor


def joint_loss(call: CallState, output, labels: torch.Tensor, num_items_in_batch=None) -> LossTerms:
    """[sum CE(calibrated logits, y) + lambda_c * sum BCE(confidence, correct)] / N, computed once per batch."""
    if labels.dtype.is_floating_point:
        raise ValueError(
            f"UMEMA trains single-label classifiers: labels must be integer class ids, got {labels.dtype}."
        )
    logits = output["logits"]
    labels = labels.to(logits.device)
    valid = labels != IGNORE_INDEX
    task_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    weight = call.config.confidence_loss_weight
    if "confidence" in output and output["confidence"] is not None and weight > 0:
        correct = logits.detach().argmax(-1) == labels
        confidence_sum, _ = confidence_targets_loss(output["confidence"].float(), correct, valid)
    else:
        confidence_sum = torch.zeros((), device=task_sum.device)
    items = valid.sum()
    denominator = num_items_in_batch if num_items_in_batch is not None else items.clamp_min(1)
    denominator = torch.as_tensor(denominator, device=task_sum.device, dtype=task_sum.dtype)
    loss = (task_sum + weight * confidence_sum) / denominator
    return LossTerms(loss=loss, task_sum=task_sum.detach(), confidence_sum=confidence_sum.detach(), items=items)


def queue_memory_write(call: CallState) -> None:
    """Queue this training batch's memory write; rows without any valid token (all padding) get weight 0."""
    if call.fused_summary is None or call.modules.memory is None:
        return
    uncertainty_memory = call.uncertainty.memory if call.uncertainty is not None else None
    call.modules.memory.queue_write(call.fused_summary, uncertainty_memory, weights=call.mask.any(1))


class TrainingLog:
    """Sums of what the training log reports, kept as tensors on the model's device until `pop` (log time), then
    summed across data-parallel ranks. Also remembers whether any training loss was not finite."""

    NAMES = ("task_sum", "confidence_sum", "items", "confidence", "temperature", "positions")

    def __init__(self):
        self.sums: Optional[torch.Tensor] = None
        self.nonfinite: Optional[torch.Tensor] = None

    def add(self, call: CallState, output, terms: Optional[LossTerms]) -> None:
        values = [torch.zeros((), device=call.mask.device)] * len(self.NAMES)
        if terms is not None:
            values[0], values[1], values[2] = terms.task_sum, terms.confidence_sum, terms.items
            finite = torch.isfinite(terms.loss.detach())
            self.nonfinite = ~finite if self.nonfinite is None else self.nonfinite | ~finite
        if call.uncertainty is not None and hasattr(output, "keys"):
            confidence, temperature = output["confidence"].detach(), output["temperature"].detach()
            valid = call.mask if confidence.dim() == 2 else torch.ones_like(confidence, dtype=torch.bool)
            values[3], values[4], values[5] = confidence[valid].sum(), temperature[valid].sum(), valid.sum()
        batch = torch.stack([value.float().to(call.mask.device) for value in values])
        self.sums = batch if self.sums is None else self.sums + batch

    def diverged(self) -> bool:
        """Whether a training loss since the last call was NaN or inf (one host sync); resets the flag."""
        flag, self.nonfinite = self.nonfinite, None
        return flag is not None and bool(flag)

    def pop(self) -> dict[str, float]:
        if self.sums is None:
            return {}
        sums, self.sums = self.sums, None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sums = sums.clone()
            torch.distributed.all_reduce(sums)
        task, confidence_loss, items, confidence, temperature, positions = sums.tolist()
        logs = {}
        if items > 0:
            logs["task_loss"] = round(task / items, 4)
            logs["confidence_loss"] = round(confidence_loss / items, 4)
        if positions > 0:
            logs["mean_confidence"] = confidence / positions
            logs["mean_temperature"] = temperature / positions
        return logs
