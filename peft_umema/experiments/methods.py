"""What every experiment method shares: options, the fit/predict/save/load protocol, the registry, and the
LoRA and UMEMA methods. Baselines add themselves in `baseline_methods.py`; `runs.py` drives them all.
"""

from __future__ import annotations

import dataclasses
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import peft
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.pytorch_utils import Conv1D

from ..constants import UNCERTAINTY_OUTPUT_FIELDS
from ..data.loaders import SEQ_CLS
from ..data.preprocessing import (
    IGNORE_INDEX,
)
from ..evaluation.metrics import classification_metrics, token_classification_metrics
from ..training.trainer import UMEMATrainer
from ..tuner.attach import find_head_name
from ..tuner.config import UMEMAConfig
from ..uncertainty.calibration import calibrate_uncertainty
from .backbones import load_backbone
from .checks import check_learning_rate

UM_OUTPUT_FIELDS = UNCERTAINTY_OUTPUT_FIELDS[:3]  # confidence, aleatoric, epistemic (not the temperature)
# Scores of UM's own confidence, reported beside those of the calibrated softmax: UM's confidence is trained to
# predict whether the prediction is right, so error detection is what it is for.
UM_CONFIDENCE_METRICS = ("ece", "auroc_error", "aurc")
# score_predictions names the scores of a method's own confidence (UM's, AdUE's) with this prefix.
OWN_CONFIDENCE_PREFIX = "um_confidence_"
ERROR_DETECTION_METRICS = ("auroc_error", "aurc")


# ----------------------------------------------------------------------------------------------------------------
# Options and what methods exchange with the driver
# ----------------------------------------------------------------------------------------------------------------


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass
class TrainOptions:
    """Hyper-parameters shared by every method. The defaults are those of the offline demo run (MiniLM, BBC News).

    The learning rate is 1e-3 because LoRA on a small encoder with a new head needs it: on the demo (3 epochs,
    64 tokens) the paper's 2e-4 for GPT-2/Llama reaches 42% test accuracy, 1e-3 reaches 94%.
    """

    rank: int = 8
    use_um: bool = True
    use_ema: bool = True
    epochs: float = 3.0
    learning_rate: float = 1e-3
    batch_size: int = 16
    max_length: int = 128
    patience: int = 2
    max_steps: int = -1
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    target_modules: str | list[str] = "all-linear"
    progress: bool = True
    # QLoRA: the backbone's linear layers in 4-bit NF4 or 8-bit (bitsandbytes); LoRA, UM, EMA and the memory in fp32
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    # UMEMA only: "detached" (T fitted on dev after training) or "joint" (T trained with the rest, the paper's reading)
    temperature_training: str = "detached"
    # UMEMA only: UM's fixed logit scale s (UMEMAConfig.logit_scale)
    logit_scale: float = UMEMAConfig.logit_scale

    def __post_init__(self):
        positive_ints = {"rank": self.rank, "batch_size": self.batch_size, "max_length": self.max_length,
                         "patience": self.patience}
        for name, value in positive_ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not _finite_number(self.epochs) or not self.epochs > 0:
            raise ValueError(f"epochs must be a finite number > 0, got {self.epochs!r}.")
        check_learning_rate(self.learning_rate)
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or (
            self.max_steps < 1 and self.max_steps != -1
        ):
            raise ValueError(
                f"max_steps must be a positive integer, or -1 to train for `epochs`; got {self.max_steps!r}."
            )
        if not _finite_number(self.warmup_ratio) or not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}.")
        for name in ("weight_decay", "max_grad_norm"):  # max_grad_norm 0: no clipping
            value = getattr(self, name)
            if not _finite_number(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        targets = self.target_modules
        if not (isinstance(targets, str) and targets) and not (
            isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) and t for t in targets)
        ):
            raise ValueError(f"target_modules must be 'all-linear' or a list of module names, got {targets!r}.")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("Choose one of load_in_4bit and load_in_8bit, not both.")

    @property
    def quantization(self) -> dict:
        """The `load_backbone` arguments that load the backbone quantized (empty for full precision)."""
        return {name: True for name in ("load_in_4bit", "load_in_8bit") if getattr(self, name)}


@dataclasses.dataclass
class RunSetup:
    """What a method fits on: the backbone, the task, tokenized train and dev splits, and the options."""

    backbone: str
    task_type: str
    label_names: list[str]
    tokenizer: Any
    train_dataset: Dataset
    eval_dataset: Dataset
    options: TrainOptions
    seed: int
    work_dir: Path

    @property
    def collator(self):
        return data_collator(self.task_type, self.tokenizer)

    @property
    def selection_metric(self) -> str:
        return selection_metric(self.task_type)


@dataclasses.dataclass
class Fitted:
    """A fitted model as a method hands it back to itself for `predict` and `save`, with its training log.

    Methods with post-hoc state (a fitted temperature, weight samples, several members) subclass it.
    """

    model: Any
    log_history: list[dict] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Predictions:
    """Outputs per example (sequence tasks: arrays [C] / scalars) or per scored word (token tasks: [W, C] / [W]).

    Token tasks keep the first sub-token of every word, the positions that carry a label. `labels` holds the gold
    ids (dummies when predicting free text). `confidence`, `aleatoric` and `epistemic` are the method's own scores,
    None for methods that have none.
    """

    probs: list[np.ndarray]
    labels: list[np.ndarray]
    confidence: Optional[list[np.ndarray]] = None
    aleatoric: Optional[list[np.ndarray]] = None
    epistemic: Optional[list[np.ndarray]] = None


# ----------------------------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------------------------


class Method(ABC):
    """How one method fits, predicts, saves and reloads; `train`/`evaluate`/`predict` do everything else.

    To add a method, subclass this (or `LoRAMethod`, to reuse its Trainer loop), then `register_method(instance)`;
    `train(method=name)` and `peft-umema train --method name` pick it up. `fit` may return a `Fitted` subclass that
    carries post-hoc state; `save` must write it into the run folder so that `load` can restore it.
    """

    name: str
    description: str

    @abstractmethod
    def fit(self, setup: RunSetup) -> Fitted:
        """Build a model for `setup` and train it, selecting on the dev split."""

    @abstractmethod
    def predict(self, fitted: Fitted, batches: DataLoader, progress: bool = True) -> Predictions:
        """Predictions on `batches` (dicts with `labels` and the model inputs)."""

    @abstractmethod
    def save(self, fitted: Fitted, output_dir: Path) -> None:
        """Write the fitted model into `output_dir` (beside the tokenizer and the run files)."""

    @abstractmethod
    def load(self, output_dir: Path, run_info: dict) -> Fitted:
        """Rebuild what `save` wrote; `run_info` is the folder's `umema_run.json`."""

    @abstractmethod
    def parameter_counts(self, fitted: Fitted) -> tuple[int, int]:
        """(trainable, total) parameters."""

    def method_details(self, fitted: Fitted, predictions: Predictions) -> dict:
        """What metrics.json reports about this method besides the shared metrics (options, post-hoc fits)."""
        return {}


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Make `method` available under `method.name` to `train` and the command line."""
    if method.name in METHODS:
        raise ValueError(f"A method named {method.name!r} is already registered.")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}.")
    return METHODS[name]


class LoRAMethod(Method):
    """Plain LoRA (peft `LoraConfig`) trained with the HF `Trainer`: the reference every method is compared with.

    Subclasses change the adapter (`peft_config`), the Trainer class, or what `predict` reads off the outputs.
    """

    name = "lora"
    description = "plain LoRA; confidence = maximum softmax probability"
    trainer_class = Trainer

    def peft_config(self, setup: RunSetup, model: torch.nn.Module) -> peft.PeftConfig:
        return LoraConfig(task_type=setup.task_type, **lora_options(setup.options, model))

    def fit(self, setup: RunSetup) -> Fitted:
        set_seed(setup.seed)
        base, _ = load_backbone(
            setup.backbone, setup.task_type, len(setup.label_names), id2label=setup.label_names,
            **setup.options.quantization,
        )
        model = get_peft_model(base, self.peft_config(setup, base))
        trainer = self.trainer_class(**trainer_arguments(model, setup))
        trainer.train()
        return Fitted(model=model, log_history=list(trainer.state.log_history))

    def predict(self, fitted: Fitted, batches: DataLoader, progress: bool = True) -> Predictions:
        return collect_predictions(fitted.model, batches, progress=progress)

    def save(self, fitted: Fitted, output_dir: Path) -> None:
        fitted.model.save_pretrained(output_dir)

    def load(self, output_dir: Path, run_info: dict) -> Fitted:
        base, _ = load_backbone(
            run_info["backbone"], run_info["task_type"], len(run_info["label_names"]), id2label=run_info["label_names"],
            **{name: True for name in ("load_in_4bit", "load_in_8bit") if run_info.get(name)},
        )
        model = PeftModel.from_pretrained(base, output_dir)
        return Fitted(model=model.eval())

    def parameter_counts(self, fitted: Fitted) -> tuple[int, int]:
        return fitted.model.get_nb_trainable_parameters()


@dataclasses.dataclass
class UMEMAFitted(Fitted):
    calibration: dict = dataclasses.field(default_factory=dict)


class UMEMAMethod(LoRAMethod):
    """LoRA + Uncertainty Modeling + External Memory Augmentation, trained with the joint UMEMA objective, then
    UM's temperature and confidence refit on the dev split (`calibrate_uncertainty`)."""

    name = "umema"
    description = "LoRA + UM + EMA; calibrated softmax plus UM's confidence, aleatoric and epistemic uncertainty"
    trainer_class = UMEMATrainer

    def peft_config(self, setup: RunSetup, model: torch.nn.Module) -> peft.PeftConfig:
        options = setup.options
        return UMEMAConfig(
            task_type=setup.task_type, use_um=options.use_um, use_ema=options.use_ema,
            temperature_training=options.temperature_training, logit_scale=options.logit_scale,
            **lora_options(options, model)
        )

    def fit(self, setup: RunSetup) -> Fitted:
        fitted = super().fit(setup)
        calibration = {}
        if setup.options.use_um:
            dev = dev_batches(setup.eval_dataset, setup.task_type, setup.tokenizer, setup.options.batch_size)
            calibration = calibrate_uncertainty(fitted.model, dev)
        return UMEMAFitted(model=fitted.model, log_history=fitted.log_history, calibration=calibration)

    def predict(self, fitted: Fitted, batches: DataLoader, progress: bool = True) -> Predictions:
        config = fitted.model.peft_config[fitted.model.active_adapter]
        fields = UM_OUTPUT_FIELDS if config.use_um else ()
        return collect_predictions(fitted.model, batches, fields, progress=progress)

    def method_details(self, fitted: Fitted, predictions: Predictions) -> dict:
        return {"dev_calibration": fitted.calibration} if isinstance(fitted, UMEMAFitted) else {}


register_method(UMEMAMethod())
register_method(LoRAMethod())


def lora_options(options: TrainOptions, model: torch.nn.Module) -> dict:
    """The LoRA settings every method shares, so that comparisons differ in the method only.

    A BERT-style pooler (dense + tanh on the first token, which BERT's sequence classifiers read) is trained in full
    (`modules_to_save`) instead of getting LoRA: in sentence-embedding checkpoints such as all-MiniLM-L6-v2 it was
    never trained for classification (its bias is all zeros). Plain LoRA on MiniLM, SemEval-2010 at 1000 shots,
    seed 0, lr 1e-3, 5 epochs, batch 16, 128 tokens: with LoRA on the pooler it predicted the majority class at
    every epoch (test accuracy 0.167, macro-F1 0.015); with the pooler trained, 0.585 and 0.453 (full test split).
    """
    target_modules = options.target_modules
    if target_modules == "all-linear":
        target_modules = linear_layers_but_head(model)
    settings = {"r": options.rank, "lora_alpha": 2 * options.rank, "lora_dropout": 0.1, "target_modules": target_modules}
    poolers = pooler_modules(model)
    if poolers:
        settings["modules_to_save"] = poolers
    return settings


def pooler_modules(model: torch.nn.Module) -> list[str]:
    """Names of the BERT-style poolers the model's head reads (`bert.pooler`); token classifiers have none."""
    return sorted({
        name.rsplit(".", 1)[-1] for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] == "pooler" and module is not None and any(True for _ in module.parameters())
    })


LINEAR_LAYER_TYPES = (torch.nn.Linear, Conv1D)


def linear_layers_but_head(model: torch.nn.Module) -> list[str]:
    """peft's "all-linear", spelled out: the names of all linear layers except the classification head, counting
    GPT-2's `Conv1D` (a linear layer with transposed weights) and 4/8-bit bitsandbytes linears.

    peft leaves out the head of sequence classifiers only; on a token classifier it wraps the head in LoRA and then
    fails to make it fully trainable (`modules_to_save`).
    """
    head_name = find_head_name(model, None)
    excluded = {getattr(model, head_name), model.get_output_embeddings()}
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, LINEAR_LAYER_TYPES) and module not in excluded
    }
    return sorted(names - {head_name})


def trainer_arguments(model: torch.nn.Module, setup: RunSetup) -> dict:
    """The Trainer's keyword arguments for fitting `model` on `setup`: training arguments, dev metrics and early
    stopping, shared by every method so that a comparison differs in the method only."""
    return {
        "model": model,
        "args": training_arguments(setup),
        "train_dataset": setup.train_dataset,
        "eval_dataset": setup.eval_dataset,
        "data_collator": setup.collator,
        "processing_class": setup.tokenizer,
        "compute_metrics": dev_metrics_function(setup.task_type, setup.label_names),
        "preprocess_logits_for_metrics": _logits_only,
        "callbacks": [EarlyStoppingCallback(early_stopping_patience=setup.options.patience)],
    }


def training_arguments(setup: RunSetup) -> TrainingArguments:
    """AdamW, linear warm-up and decay, gradient clipping; dev evaluation every epoch and the best epoch kept."""
    options = setup.options
    return TrainingArguments(
        output_dir=str(setup.work_dir),
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=2 * options.batch_size,
        learning_rate=options.learning_rate,
        num_train_epochs=options.epochs,
        max_steps=options.max_steps,
        lr_scheduler_type="linear",
        warmup_steps=options.warmup_ratio,
        weight_decay=options.weight_decay,
        max_grad_norm=options.max_grad_norm,
        optim="adamw_torch",
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="epoch",
        save_total_limit=1,
        save_only_model=True,
        load_best_model_at_end=True,
        metric_for_best_model=setup.selection_metric,
        greater_is_better=True,
        seed=setup.seed,
        data_seed=setup.seed,
        report_to=[],
        disable_tqdm=not options.progress,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def selection_metric(task_type: str) -> str:
    """Dev metric for early stopping and model selection: macro-F1 (sequence tasks), entity span F1 (token tasks)."""
    return "macro_f1" if task_type == SEQ_CLS else "f1"


def dev_metrics_function(task_type: str, label_names: Sequence[str]):
    """`compute_metrics` for the Trainer: task scores and calibration of the softmax on the dev split."""

    def compute_metrics(evaluation) -> dict[str, float]:
        probs = torch.from_numpy(np.asarray(evaluation.predictions, dtype=np.float32)).softmax(-1)
        if task_type == SEQ_CLS:
            return classification_metrics(probs, evaluation.label_ids)
        return token_classification_metrics(probs, evaluation.label_ids, label_names)

    return compute_metrics


def _logits_only(outputs, labels):
    """Keep the logits of UMEMA's outputs (logits, confidence, ...), so evaluation does not hoard the rest."""
    return outputs[0] if isinstance(outputs, tuple) else outputs


def data_collator(task_type: str, tokenizer):
    """Pads each batch to its longest row; token tasks pad their labels with -100."""
    if task_type == SEQ_CLS:
        return DataCollatorWithPadding(tokenizer)
    return DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE_INDEX)


def collect_predictions(
    model: torch.nn.Module, batches: DataLoader, output_fields: Sequence[str] = (), progress: bool = True
) -> Predictions:
    """Softmax probabilities (and the named per-prediction output fields) of `model` over `batches`, in eval mode.

    Labels are kept out of the forward pass, so no loss is computed; token tasks keep the labelled positions only.
    """
    device = next(model.parameters()).device
    collected = {name: [] for name in ("probs", "labels", *output_fields)}
    model.eval()
    with torch.no_grad():
        for batch in tqdm(batches, desc="Predicting", disable=not progress, leave=False):
            labels = batch.pop("labels").numpy()
            outputs = model(**{name: value.to(device) for name, value in batch.items()})
            values = {"probs": outputs.logits.float().softmax(-1).cpu().numpy(), "labels": labels}
            for name in output_fields:
                values[name] = outputs[name].float().cpu().numpy()
            for row in range(len(labels)):
                for name, value in values.items():
                    collected[name].append(value[row][labels[row] != IGNORE_INDEX] if labels.ndim == 2 else value[row])
    return Predictions(**{name: collected.get(name) for name in ("probs", "labels", *UM_OUTPUT_FIELDS)})


# ----------------------------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------------------------


def score_predictions(predictions: Predictions, task_type: str, label_names: Sequence[str]) -> dict[str, float]:
    """Task and calibration metrics of the calibrated softmax, plus `um_confidence_*` for UM's own confidence.

    Sequence tasks: accuracy and macro-F1; token tasks: entity span precision/recall/F1 (seqeval) and token
    accuracy, with calibration over the tokens that carry a label.
    """
    if task_type == SEQ_CLS:
        probs, labels = np.stack(predictions.probs), np.asarray(predictions.labels)

        def metrics(confidences=None):
            return classification_metrics(probs, labels, confidences)

        um_confidence = None if predictions.confidence is None else np.asarray(predictions.confidence)
    else:

        def metrics(confidences=None):
            return token_classification_metrics(predictions.probs, predictions.labels, label_names, confidences)

        um_confidence = predictions.confidence
    scores = metrics()
    if um_confidence is not None:
        um_scores = metrics(um_confidence)
        scores.update({OWN_CONFIDENCE_PREFIX + name: um_scores[name] for name in UM_CONFIDENCE_METRICS})
    return scores


def own_confidence_score(test: dict, key: str):
    """A test score; the error-detection ones of the method's own confidence where it reports one (UMEMA's
    fitted confidence, AdUE's), since detecting errors is what that confidence is for."""
    if key in ERROR_DETECTION_METRICS:
        return test.get(OWN_CONFIDENCE_PREFIX + key, test.get(key))
    return test.get(key)


def confidence_and_correctness(predictions: Predictions) -> tuple[np.ndarray, np.ndarray]:
    """Maximum calibrated probability and whether the prediction is right, over every scored example or word."""
    probs = np.concatenate([np.reshape(p, (-1, p.shape[-1])) for p in predictions.probs])
    labels = np.concatenate([np.reshape(label, -1) for label in predictions.labels])
    return probs.max(axis=1), probs.argmax(axis=1) == labels



def json_safe(value):
    """NaN (e.g. an error-detection AUROC with no errors) becomes null: JSON has no NaN."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(json_safe(content), indent=2, allow_nan=False) + "\n", encoding="utf-8")



def dev_batches(dataset: Dataset, task_type: str, tokenizer, batch_size: int) -> DataLoader:
    """Unshuffled, padded batches of a tokenized split (for evaluation and post-hoc fits)."""
    return DataLoader(dataset, batch_size=batch_size, collate_fn=data_collator(task_type, tokenizer))
