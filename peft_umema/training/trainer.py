"""`UMEMATrainer`: the HF Trainer with the paper's joint objective, exact under gradient accumulation."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer

from ..uncertainty.estimator import confidence_targets_loss
from .callbacks import MemoryUpdateCallback, find_umema_tuner


class UMEMATrainer(Trainer):
    """`Trainer` for UMEMA adapters.

    loss = [ sum CE(calibrated logits, y) + lambda_c * sum BCE(confidence, prediction is correct) ] / N

    where the sums run over the labelled examples (SEQ_CLS) or tokens (TOKEN_CLS) of the micro-batch and N is the
    number of labelled items in the whole accumulated batch (`num_items_in_batch`), so gradient accumulation over
    k micro-batches gives the same gradient as one k-times larger batch. Both terms are logged as `task_loss` and
    `confidence_loss`. A `MemoryUpdateCallback` is added unless one is passed.
    """

    # we normalise by num_items_in_batch ourselves; training_step must not divide by the accumulation steps again
    loss_is_scaled_for_ga = True

    def __init__(self, *args, **kwargs):
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if not any(isinstance(c, MemoryUpdateCallback) for c in callbacks):
            callbacks.insert(0, MemoryUpdateCallback())  # first, so other callbacks see the committed bank
        super().__init__(*args, callbacks=callbacks, **kwargs)
        if find_umema_tuner(self.model) is None:
            raise ValueError("UMEMATrainer needs a model from get_peft_model(model, UMEMAConfig(...)).")
        # makes the Trainer count labelled items over the accumulated batch and pass them to compute_loss
        self.model_accepts_loss_kwargs = True
        self._loss_sums = {"task_loss": 0.0, "confidence_loss": 0.0}
        self._loss_count = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "labels" not in inputs:
            raise ValueError("UMEMATrainer needs `labels` in every batch.")
        labels = inputs["labels"]
        outputs = model(**inputs)
        logits = outputs["logits"]
        tuner = find_umema_tuner(model)
        config = tuner.peft_config[tuner._single_active_adapter()]
        valid = labels != -100
        task_sum = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        if "confidence" in outputs and config.confidence_loss_weight > 0:
            correct = logits.detach().argmax(-1) == labels
            confidence_sum, _ = confidence_targets_loss(outputs["confidence"].float(), correct, valid)
        else:
            confidence_sum = torch.zeros((), device=task_sum.device)
        denominator = num_items_in_batch if num_items_in_batch is not None else valid.sum().clamp_min(1)
        denominator = torch.as_tensor(denominator, device=task_sum.device, dtype=task_sum.dtype)
        task_loss, confidence_loss = task_sum / denominator, confidence_sum / denominator
        if model.training:
            if num_items_in_batch is None:
                # per-micro-batch means: average them over the accumulation steps ourselves
                task_loss = task_loss / self.current_gradient_accumulation_steps
                confidence_loss = confidence_loss / self.current_gradient_accumulation_steps
            elif self.args.average_tokens_across_devices:
                # num_items_in_batch counts all ranks and DDP averages gradients: undo the 1/world_size
                task_loss = task_loss * self.accelerator.num_processes
                confidence_loss = confidence_loss * self.accelerator.num_processes
            self._loss_sums["task_loss"] += float(task_loss.detach())
            self._loss_sums["confidence_loss"] += float(confidence_loss.detach())
            self._loss_count += 1
        loss = task_loss + config.confidence_loss_weight * confidence_loss
        outputs["loss"] = loss
        return (loss, outputs) if return_outputs else loss

    def push_to_hub(self, commit_message: str = "End of training", blocking: bool = True, token=None, revision=None,
                    **kwargs):
        """Upload the adapter with its memory and a `peft_umema` model card (base model, task, the last
        evaluation's calibration figures, `import peft_umema`), instead of peft's generic card."""
        from ..hub import push_to_hub

        repo_id = self.args.hub_model_id or Path(self.args.output_dir).name
        return push_to_hub(
            self, repo_id, token=token or self.args.hub_token, private=self.args.hub_private_repo,
            commit_message=commit_message,
        )

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._loss_count:
            # each optimizer step summed `gradient_accumulation_steps` micro-batch terms into one batch mean
            steps = self._loss_count / self.current_gradient_accumulation_steps
            for name, total in self._loss_sums.items():
                logs[name] = round(total / steps, 4)
            self._loss_sums = dict.fromkeys(self._loss_sums, 0.0)
            self._loss_count = 0
        super().log(logs, *args, **kwargs)
