"""The Python API behind the `peft-umema` command: `train`, `evaluate` and `predict`, one call each.

`train` writes everything `evaluate` and `predict` need into one folder: the adapter (`save_pretrained`: weights and
memory bank), the tokenizer, `umema_run.json` (method, backbone, task, label names), `metrics.json` and
`reliability.png`. Methods plug in through `METHODS`: each builds and fits its model, predicts, saves and reloads
it, while data, metrics and files stay the same for all, so methods compare on equal terms.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import datasets
import numpy as np
import peft
import torch
import transformers
from datasets import ClassLabel, Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    AutoTokenizer,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    Trainer,
    TrainingArguments,
    set_seed,
)

from .. import __version__
from ..backbones import load_backbone, resolve_backbone
from ..config import UMEMAConfig
from ..data.loaders import SEQ_CLS, label_names_of, load_benchmark, task_type_of
from ..data.preprocessing import (
    IGNORE_INDEX,
    corrupt_missing,
    k_shot_subset,
    prepare_tokenizer,
    tokenize_dataset,
)
from ..evaluation.metrics import classification_metrics, token_classification_metrics
from ..evaluation.reliability import save_reliability_diagram
from ..introspection import find_head_name
from ..uncertainty.calibration import calibrate_uncertainty
from .trainer import UMEMATrainer

RUN_INFO_NAME = "umema_run.json"
METRICS_NAME = "metrics.json"
RELIABILITY_NAME = "reliability.png"
CHECKPOINTS_NAME = "checkpoints"
RUN_INFO_VERSION = 1

# The offline demo: a real pretrained encoder on real news articles, a few minutes on 2 CPU cores.
DEFAULT_MODEL = "minilm"
DEFAULT_DATA = "bbc_news_demo"
DEFAULT_SHOTS = 400
DEFAULT_OUTPUT_DIR = "umema-run"

UM_OUTPUT_FIELDS = ("confidence", "aleatoric", "epistemic")
# Scores of UM's own confidence, reported beside those of the calibrated softmax: UM's confidence is trained to
# predict whether the prediction is right, so error detection is what it is for.
UM_CONFIDENCE_METRICS = ("ece", "auroc_error", "aurc")
# Words for tagging free text: URLs, @mentions and #hashtags stay whole (as in tweet NER data), punctuation splits off.
WORD_PATTERN = re.compile(r"https?://\S+|[@#]?\w+(?:['’.-]\w+)*|[^\w\s]")


# ----------------------------------------------------------------------------------------------------------------
# Options and what methods exchange with the driver
# ----------------------------------------------------------------------------------------------------------------


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

    def __post_init__(self):
        positive_ints = {"rank": self.rank, "batch_size": self.batch_size, "max_length": self.max_length,
                         "patience": self.patience}
        for name, value in positive_ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs!r}.")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}.")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps == 0:
            raise ValueError(
                f"max_steps must be a positive integer, or -1 to train for `epochs`; got {self.max_steps!r}."
            )
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}.")


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
            setup.backbone, setup.task_type, len(setup.label_names), id2label=setup.label_names
        )
        model = get_peft_model(base, self.peft_config(setup, base))
        options = setup.options
        trainer = self.trainer_class(
            model=model,
            args=training_arguments(setup),
            train_dataset=setup.train_dataset,
            eval_dataset=setup.eval_dataset,
            data_collator=setup.collator,
            processing_class=setup.tokenizer,
            compute_metrics=dev_metrics_function(setup.task_type, setup.label_names),
            preprocess_logits_for_metrics=_logits_only,
            callbacks=[EarlyStoppingCallback(early_stopping_patience=options.patience)],
        )
        trainer.train()
        return Fitted(model=model, log_history=list(trainer.state.log_history))

    def predict(self, fitted: Fitted, batches: DataLoader, progress: bool = True) -> Predictions:
        return collect_predictions(fitted.model, batches, progress=progress)

    def save(self, fitted: Fitted, output_dir: Path) -> None:
        fitted.model.save_pretrained(output_dir)

    def load(self, output_dir: Path, run_info: dict) -> Fitted:
        base, _ = load_backbone(
            run_info["backbone"], run_info["task_type"], len(run_info["label_names"]), id2label=run_info["label_names"]
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
            task_type=setup.task_type, use_um=options.use_um, use_ema=options.use_ema, **lora_options(options, model)
        )

    def fit(self, setup: RunSetup) -> Fitted:
        fitted = super().fit(setup)
        calibration = {}
        if setup.options.use_um:
            dev = _batches(setup.eval_dataset, setup.task_type, setup.tokenizer, setup.options.batch_size)
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
    """The LoRA settings every method shares, so that comparisons differ in the method only."""
    target_modules = options.target_modules
    if target_modules == "all-linear":
        target_modules = linear_layers_but_head(model)
    return {"r": options.rank, "lora_alpha": 2 * options.rank, "lora_dropout": 0.1, "target_modules": target_modules}


def linear_layers_but_head(model: torch.nn.Module) -> list[str]:
    """peft's "all-linear", spelled out: the names of all linear layers except the classification head.

    peft leaves out the head of sequence classifiers only; on a token classifier it wraps the head in LoRA and then
    fails to make it fully trainable (`modules_to_save`).
    """
    head_name = find_head_name(model, None)
    excluded = {getattr(model, head_name), model.get_output_embeddings()}
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module not in excluded
    }
    return sorted(names - {head_name})


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
        scores.update({f"um_confidence_{name}": um_scores[name] for name in UM_CONFIDENCE_METRICS})
    return scores


def confidence_and_correctness(predictions: Predictions) -> tuple[np.ndarray, np.ndarray]:
    """Maximum calibrated probability and whether the prediction is right, over every scored example or word."""
    probs = np.concatenate([np.reshape(p, (-1, p.shape[-1])) for p in predictions.probs])
    labels = np.concatenate([np.reshape(label, -1) for label in predictions.labels])
    return probs.max(axis=1), probs.argmax(axis=1) == labels


# ----------------------------------------------------------------------------------------------------------------
# train / evaluate / predict
# ----------------------------------------------------------------------------------------------------------------


def train(
    model: str = DEFAULT_MODEL,
    data: str | os.PathLike = DEFAULT_DATA,
    output_dir: str | os.PathLike = DEFAULT_OUTPUT_DIR,
    *,
    method: str = "umema",
    shots: Optional[int] = DEFAULT_SHOTS,
    seed: int = 0,
    missing_rate: float = 0.0,
    **options,
) -> dict:
    """Fine-tune `model` on `data` with `method`, pick the best epoch on dev, score the test split, save the run.

    Args:
        model: backbone name (`minilm`, `smollm2-135m`), hub name or local folder.
        data: benchmark name (see `load_benchmark`), local path, or hub data set.
        output_dir: run folder, created or overwritten: adapter, tokenizer, `umema_run.json`, `metrics.json`,
            `reliability.png`.
        method: a name in `METHODS` (`umema`, `lora`, ...).
        shots: train on a seeded, stratified subset of this many training examples; None uses the whole split.
        seed: seeds the subset, the corruption, the initialisation and the data order.
        missing_rate: drop this fraction of the words of every example in every split (the paper's
            missing-information study); 0 keeps the data intact.
        **options: any `TrainOptions` field (rank, use_um, use_ema, epochs, learning_rate, batch_size, max_length,
            patience, max_steps, warmup_ratio, weight_decay, max_grad_norm, target_modules, progress).

    Returns:
        The contents of `metrics.json`: `test` metrics, `dev` metrics of the kept epoch, and the run's settings,
        sizes, parameter counts and timings.
    """
    started = time.perf_counter()
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(TrainOptions)})
    if unknown:
        raise ValueError(
            f"Unknown training option(s) {unknown}; valid ones: {[f.name for f in dataclasses.fields(TrainOptions)]}."
        )
    train_options = TrainOptions(**options)
    chosen = get_method(method)
    output_dir = Path(output_dir)
    backbone, data_name = _portable_name(model), _portable_name(data)

    splits = load_benchmark(data)
    task_type, label_names = task_type_of(splits), label_names_of(splits)
    if shots is not None:
        splits["train"] = k_shot_subset(splits["train"], shots, seed)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(resolve_backbone(backbone)))
    with _datasets_progress(train_options.progress):
        if missing_rate:
            splits = corrupt_missing(splits, missing_rate, seed)
        tokenized = tokenize_dataset(splits, tokenizer, train_options.max_length)
    setup = RunSetup(
        backbone=backbone,
        task_type=task_type,
        label_names=label_names,
        tokenizer=tokenizer,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["validation"],
        options=train_options,
        seed=seed,
        work_dir=output_dir / CHECKPOINTS_NAME,
    )

    fit_started = time.perf_counter()
    fitted = chosen.fit(setup)
    fit_seconds = time.perf_counter() - fit_started
    shutil.rmtree(setup.work_dir, ignore_errors=True)

    test_started = time.perf_counter()
    test_batches = _batches(tokenized["test"], task_type, tokenizer, 2 * train_options.batch_size)
    predictions = chosen.predict(fitted, test_batches, progress=train_options.progress)
    test_metrics = score_predictions(predictions, task_type, label_names)
    test_seconds = time.perf_counter() - test_started

    output_dir.mkdir(parents=True, exist_ok=True)
    chosen.save(fitted, output_dir)
    tokenizer.save_pretrained(output_dir)
    run_info = {
        "format_version": RUN_INFO_VERSION,
        "method": chosen.name,
        "backbone": backbone,
        "task_type": task_type,
        "label_names": label_names,
        "max_length": train_options.max_length,
        "data": data_name,
        "peft_umema_version": __version__,
    }
    write_json(output_dir / RUN_INFO_NAME, run_info)
    confidences, correct = confidence_and_correctness(predictions)
    save_reliability_diagram(
        confidences, correct, output_dir / RELIABILITY_NAME, title=f"{chosen.name} on {_short_name(data)} (test)"
    )
    trainable, total = chosen.parameter_counts(fitted)
    metrics = {
        "test": test_metrics,
        "dev": _best_dev_metrics(fitted.log_history, setup.selection_metric),
        "method": chosen.name,
        "backbone": backbone,
        "data": data_name,
        "task_type": task_type,
        "label_names": label_names,
        "seed": seed,
        "shots": shots,
        "missing_rate": missing_rate,
        "config": dataclasses.asdict(train_options),
        "sizes": {split: len(dataset) for split, dataset in splits.items()},
        "epochs_trained": _epochs_trained(fitted.log_history),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "method_details": chosen.method_details(fitted, predictions),
        "timings": {
            "fit_seconds": round(fit_seconds, 2),
            "test_seconds": round(test_seconds, 2),
            "total_seconds": round(time.perf_counter() - started, 2),
        },
        "versions": _versions(),
    }
    write_json(output_dir / METRICS_NAME, metrics)
    return json_safe(metrics)


def evaluate(
    adapter_dir: str | os.PathLike,
    data: str | os.PathLike,
    *,
    split: str = "test",
    missing_rate: float = 0.0,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
    reliability_path: Optional[str | os.PathLike] = None,
) -> dict:
    """Score a saved run on a split of `data`: the same metrics as `train` writes, labels matched by name.

    `missing_rate` drops that fraction of the words of every example first (seeded by `seed`), to measure how a
    model trained on complete data copes with incomplete inputs. Returns `{"adapter", "data", "split",
    "missing_rate", "examples", "metrics"}`; with `reliability_path`, also draws the reliability diagram there.
    """
    run = load_run(adapter_dir)
    splits = load_benchmark(data)
    if task_type_of(splits) != run.task_type:
        raise ValueError(
            f"{data} is a {task_type_of(splits)} data set but the adapter in {adapter_dir} was trained for "
            f"{run.task_type}; evaluate it on data of its own task."
        )
    if split not in splits:
        raise ValueError(f"{data} has no split {split!r}; it has {list(splits)}.")
    with _datasets_progress(progress):
        dataset = _relabel(splits[split], run.label_names, data)
        if missing_rate:
            dataset = corrupt_missing(dataset, missing_rate, seed)
        tokenized = tokenize_dataset(dataset, run.tokenizer, run.info["max_length"])
    predictions = run.method.predict(
        run.fitted, _batches(tokenized, run.task_type, run.tokenizer, batch_size), progress=progress
    )
    if reliability_path is not None:
        save_reliability_diagram(
            *confidence_and_correctness(predictions), reliability_path,
            title=f"{run.method.name} on {_short_name(data)} ({split})",
        )
    return {
        "adapter": os.fspath(adapter_dir),
        "data": os.fspath(data),
        "split": split,
        "missing_rate": missing_rate,
        "examples": len(dataset),
        "metrics": score_predictions(predictions, run.task_type, run.label_names),
    }


def predict(adapter_dir: str | os.PathLike, texts: Sequence[str], *, batch_size: int = 32) -> list[dict]:
    """Label free texts with a saved run.

    Sequence tasks give one dict per text: `label`, `probability` (of that label, calibrated), `confidence` (UM's;
    the probability for methods without one), `aleatoric` and `epistemic` (None without UM). Token tasks give
    `{"text", "words": [...]}` with those fields per word; words beyond the run's `max_length` have them all None.
    """
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise ValueError("Nothing to predict: pass at least one text.")
    for number, text in enumerate(texts, start=1):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"Text {number} is empty; pass non-empty texts to predict.")
    run = load_run(adapter_dir)
    if run.task_type == SEQ_CLS:
        dataset = Dataset.from_dict({"text": list(texts), "label": [0] * len(texts)})
        words = None
    else:
        words = [WORD_PATTERN.findall(text) for text in texts]
        dataset = Dataset.from_dict({"tokens": words, "ner_tags": [[0] * len(w) for w in words]})
    with _datasets_progress(shown=False):  # a few rows of an interactive prediction
        tokenized = tokenize_dataset(dataset, run.tokenizer, run.info["max_length"])
    predictions = run.method.predict(
        run.fitted, _batches(tokenized, run.task_type, run.tokenizer, batch_size), progress=False
    )
    results = []
    for row, text in enumerate(texts):
        fields = _readout(predictions, row, run.label_names)
        if words is None:
            results.append({"text": text, **fields[0]})
            continue
        untagged = dict.fromkeys(fields[0], None) if fields else {}
        tagged = fields + [untagged] * (len(words[row]) - len(fields))
        results.append({"text": text, "words": [{"word": w, **f} for w, f in zip(words[row], tagged)]})
    return results


def _readout(predictions: Predictions, row: int, label_names: Sequence[str]) -> list[dict]:
    """Per prediction of one example: label, its probability, and the method's confidence and uncertainties."""
    probs = np.reshape(predictions.probs[row], (-1, len(label_names)))
    best = probs.argmax(axis=1)

    def field(values):
        return None if values is None else np.reshape(values[row], -1)

    confidence, aleatoric, epistemic = (
        field(predictions.confidence), field(predictions.aleatoric), field(predictions.epistemic)
    )
    readout = []
    for position, label in enumerate(best):
        probability = float(probs[position, label])
        readout.append({
            "label": label_names[label],
            "probability": probability,
            "confidence": float(confidence[position]) if confidence is not None else probability,
            "aleatoric": float(aleatoric[position]) if aleatoric is not None else None,
            "epistemic": float(epistemic[position]) if epistemic is not None else None,
        })
    return readout


# ----------------------------------------------------------------------------------------------------------------
# Run folders
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoadedRun:
    """A run folder rebuilt: its method, fitted model, tokenizer and `umema_run.json`."""

    method: Method
    fitted: Fitted
    tokenizer: Any
    info: dict

    @property
    def task_type(self) -> str:
        return self.info["task_type"]

    @property
    def label_names(self) -> list[str]:
        return self.info["label_names"]


def read_run_info(adapter_dir: str | os.PathLike) -> dict:
    """`umema_run.json` of a run folder, checked, with clear errors for folders `train` did not write."""
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Adapter folder {folder} not found; pass the output folder of `peft-umema train` (its --output-dir)."
        )
    info_path = folder / RUN_INFO_NAME
    if not info_path.is_file():
        raise FileNotFoundError(
            f"{folder} has no {RUN_INFO_NAME}, so its backbone, task and labels are unknown; pass a folder written by "
            "`peft-umema train` (or peft_umema.hub.push_to_hub), or load the adapter yourself with "
            "PeftModel.from_pretrained."
        )
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{info_path} is not valid JSON ({error}); re-run `peft-umema train`.") from None
    missing = [key for key in ("method", "backbone", "task_type", "label_names", "max_length") if key not in info]
    if missing:
        raise ValueError(f"{info_path} lacks {missing}; re-run `peft-umema train` to write a complete one.")
    return info


def load_run(adapter_dir: str | os.PathLike) -> LoadedRun:
    """Rebuild a run from its folder alone (plus its backbone, named in `umema_run.json`)."""
    info = read_run_info(adapter_dir)
    method = get_method(info["method"])
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(os.fspath(adapter_dir)))
    return LoadedRun(method=method, fitted=method.load(Path(adapter_dir), info), tokenizer=tokenizer, info=info)


def run_info_for(model: PeftModel, max_length: int = TrainOptions.max_length) -> dict:
    """The `umema_run.json` of a PeftModel trained outside `train` (e.g. to push it), read off its configs."""
    config = model.peft_config[model.active_adapter]
    base_config = model.get_base_model().config
    if not config.base_model_name_or_path:
        raise ValueError(
            "The base model has no name or path (it was built from a config), so nothing could load this adapter "
            "onto it again; save the base with save_pretrained() and load it with from_pretrained() before training."
        )
    return {
        "format_version": RUN_INFO_VERSION,
        "method": "umema" if isinstance(config, UMEMAConfig) else "lora",
        "backbone": config.base_model_name_or_path,
        "task_type": getattr(config.task_type, "value", config.task_type),
        "label_names": [base_config.id2label[index] for index in range(base_config.num_labels)],
        "max_length": max_length,
        "peft_umema_version": __version__,
    }


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def _batches(dataset: Dataset, task_type: str, tokenizer, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, collate_fn=data_collator(task_type, tokenizer))


def _relabel(dataset: Dataset, label_names: list[str], data) -> Dataset:
    """Map the data set's label ids onto the adapter's by name: token data sets number their tags by what occurs."""
    own_names = label_names_of(dataset)
    if own_names == label_names:
        return dataset
    unknown = sorted(set(own_names) - set(label_names))
    if unknown:
        raise ValueError(f"{data} has labels the adapter does not know: {unknown}; the adapter predicts {label_names}.")
    new_ids = np.array([label_names.index(name) for name in own_names])
    column = "label" if task_type_of(dataset) == SEQ_CLS else "ner_tags"
    features = dataset.features.copy()
    features[column] = ClassLabel(names=label_names)
    if column == "ner_tags":
        features[column] = datasets.Sequence(features[column])

    def renumber(batch):
        if column == "label":
            return {column: new_ids[np.asarray(batch[column], dtype=int)].tolist()}
        return {column: [new_ids[np.asarray(tags, dtype=int)].tolist() for tags in batch[column]]}

    return dataset.map(renumber, batched=True, features=features)


def _short_name(data: str | os.PathLike) -> str:
    return Path(os.fspath(data)).name


def _portable_name(name_or_path: str | os.PathLike) -> str:
    """Local paths become absolute, so that a run folder works from any working directory."""
    name = os.fspath(name_or_path)
    return str(Path(name).resolve()) if Path(name).exists() else name


def _best_dev_metrics(log_history: list[dict], metric: str) -> dict:
    """The dev metrics of the epoch that was kept (the best by `metric`), without the `eval_` prefix."""
    evaluations = [entry for entry in log_history if f"eval_{metric}" in entry]
    if not evaluations:
        return {}
    best = max(evaluations, key=lambda entry: entry[f"eval_{metric}"])
    return {
        key.removeprefix("eval_"): value for key, value in best.items() if key.startswith("eval_") or key == "epoch"
    }


def _epochs_trained(log_history: list[dict]) -> Optional[float]:
    epochs = [entry["epoch"] for entry in log_history if "epoch" in entry]
    return max(epochs) if epochs else None


def _versions() -> dict:
    return {
        "peft_umema": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


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


@contextlib.contextmanager
def _datasets_progress(shown: bool):
    """Show `datasets`' `Map` progress bars or not, inside a block (they are global switches)."""
    was_enabled = datasets.is_progress_bar_enabled()
    if not shown:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


# the baselines register themselves with the registry above (they subclass LoRAMethod, hence the late import)
from ..baselines import methods as _baseline_methods  # noqa: E402,F401
