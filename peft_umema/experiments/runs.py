"""The Python API behind the `peft-umema` command: `train`, `evaluate` and `predict`, one call each.

`train` writes everything `evaluate` and `predict` need into one folder: the adapter (`save_pretrained`: weights and
memory bank), the tokenizer, `umema_run.json` (method, backbone, task, label names), `metrics.json` and
`reliability.png`. Methods come from the registry in `methods.py` (baselines register in `baseline_methods.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import re
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import datasets
import numpy as np
import peft
import torch
import transformers
from datasets import ClassLabel, Dataset
from peft import PeftModel

from .. import __version__
from ..data.loaders import (
    SEQ_CLS,
    describe_data,
    label_names_of,
    load_data,
    task_type_of,
)
from ..data.preprocessing import (
    corrupt_missing,
    evaluation_subset,
    k_shot_subset,
    tokenize_dataset,
)
from ..evaluation.reliability import save_reliability_diagram
from ..tuner.config import UMEMAConfig
from . import baseline_methods, peft_baselines  # noqa: F401  (register the baselines)
from .checks import (
    BACKBONE_TOKENIZER_FIX,
    IMAGE_SUFFIXES,
    REPORT_FIXES,
    check_backbone,
    check_fraction,
    check_int,
    check_max_length,
    check_output_dir,
    check_output_file,
    check_rank,
    check_run_files,
    check_run_info,
    check_seed,
    load_tokenizer,
    loading_run,
    training,
)
from .methods import (
    Fitted,
    Method,
    Predictions,
    RunSetup,
    TrainOptions,
    confidence_and_correctness,
    dev_batches,
    get_method,
    json_safe,
    score_predictions,
    write_json,
)

# ----------------------------------------------------------------------------------------------------------------
# train / evaluate / predict
# ----------------------------------------------------------------------------------------------------------------

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
# Words for tagging free text: URLs, @mentions and #hashtags stay whole (as in tweet NER data), punctuation splits off.
WORD_PATTERN = re.compile(r"https?://\S+|[@#]?\w+(?:['’.-]\w+)*|[^\w\s]")



def train(
    model: str = DEFAULT_MODEL,
    data: str | os.PathLike = DEFAULT_DATA,
    output_dir: str | os.PathLike = DEFAULT_OUTPUT_DIR,
    *,
    method: str = "umema",
    shots: Optional[int] = DEFAULT_SHOTS,
    seed: int = 0,
    missing_rate: float = 0.0,
    text_column: str | Sequence[str] | None = None,
    label_column: Optional[str] = None,
    tokens_column: Optional[str] = None,
    tags_column: Optional[str] = None,
    label_names: str | Sequence[str] | None = None,
    skip_empty: bool = False,
    base_run: str | os.PathLike | None = None,
    dev_size: Optional[int] = None,
    test_size: Optional[int] = None,
    **options,
) -> dict:
    """Fine-tune `model` on `data` with `method`, pick the best epoch on dev, score the test split, save the run.

    Args:
        model: backbone name (`minilm`, `smollm2-135m`), hub name or local folder.
        data: benchmark name, path of data files (CSV, TSV, JSON, JSON lines, Parquet, CoNLL; one file or a folder
            of split files), hub data set, or a `datasets.Dataset` / `DatasetDict` (see `peft_umema.data.load_data`).
        output_dir: run folder, created or overwritten: adapter, tokenizer, `umema_run.json`, `metrics.json`,
            `reliability.png`.
        method: a name in `METHODS` (`umema`, `lora`, ...).
        shots: train on a seeded, stratified subset of this many training examples; None uses the whole split.
        seed: seeds the subset, the corruption, the initialisation and the data order.
        missing_rate: drop this fraction of the words of every example in every split (the paper's
            missing-information study); 0 keeps the data intact.
        text_column, label_column, tokens_column, tags_column, label_names, skip_empty: how to read your own data
            (see `peft_umema.data.load_data`); found by their common names when not given. Recorded in the run
            folder, so that `evaluate` reads data of the same layout the same way.
        base_run: for a method built on another's fit (`lora+ts`, `mcdropout`, `adue`, `laplace`, `ensemble` start
            from a `lora` fit), the run folder of that fit on the same backbone, data, shots, seed and options
            (its adapter files kept): it is loaded instead of trained again. Its training time counts in `fit_seconds`.
        dev_size, test_size: pick the epoch on, and score, a fixed seeded subset of this many dev / test examples
            (the same for every seed and method; for smoke runs); None: the whole split. Recorded in `sizes`.
        **options: any `TrainOptions` field (rank, use_um, use_ema, epochs, learning_rate, batch_size, max_length,
            patience, max_steps, warmup_ratio, weight_decay, max_grad_norm, target_modules, progress).

    Returns:
        The contents of `metrics.json`: `test` metrics, `dev` metrics of the kept epoch, and the run's settings,
        sizes, parameter counts and timings.
    """
    started = time.perf_counter()
    data_options = _given_data_options(
        text_column=text_column, label_column=label_column, tokens_column=tokens_column, tags_column=tags_column,
        label_names=label_names, skip_empty=skip_empty,
    )
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(TrainOptions)})
    if unknown:
        raise ValueError(
            f"Unknown training option(s) {unknown}; valid ones: {[f.name for f in dataclasses.fields(TrainOptions)]}."
        )
    train_options = TrainOptions(**options)
    chosen = get_method(method)
    check_seed(seed)
    for name, value in (("shots", shots), ("dev_size", dev_size), ("test_size", test_size)):
        if value is not None:
            check_int(value, name)
    check_fraction(missing_rate, "missing_rate", closed=True)
    output_dir = check_output_dir(output_dir)
    backbone, data_name = _portable_name(model), _portable_name(data)
    found = check_backbone(backbone)  # before the data: a wrong name fails at once
    check_max_length(train_options.max_length, found)
    check_rank(train_options.rank, found)

    splits, schema = load_data(data, **data_options)
    task_type, label_names = schema.task_type, list(schema.label_names)
    if shots is not None and shots >= len(splits["train"]):
        warnings.warn(f"shots={shots} but the train split has {len(splits['train'])} examples: training on all.")
        shots = None
    if shots is not None:
        splits["train"] = k_shot_subset(splits["train"], shots, seed, schema=schema)
    full_sizes = {split: len(dataset) for split, dataset in splits.items()}
    splits["validation"] = evaluation_subset(splits["validation"], dev_size)
    splits["test"] = evaluation_subset(splits["test"], test_size)
    tokenizer = load_tokenizer(found.path, where=f"the backbone {backbone}", fix=BACKBONE_TOKENIZER_FIX)
    with _datasets_progress(train_options.progress):
        if missing_rate:
            splits = corrupt_missing(splits, missing_rate, seed, schema=schema)
        tokenized = tokenize_dataset(splits, tokenizer, train_options.max_length, schema=schema)
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
    with training(train_options.learning_rate):
        if base_run is None:
            fitted = chosen.fit(setup)
            base_seconds = 0.0
        else:
            base, base_seconds = _base_fit(chosen, base_run, backbone, data_name, shots, seed, train_options)
            fitted = chosen.fit_on(base, setup)
    fit_seconds = time.perf_counter() - fit_started + base_seconds
    shutil.rmtree(setup.work_dir, ignore_errors=True)

    test_started = time.perf_counter()
    test_batches = dev_batches(tokenized["test"], task_type, tokenizer, 2 * train_options.batch_size)
    predictions = chosen.predict(fitted, test_batches, progress=train_options.progress)
    test_metrics = score_predictions(predictions, task_type, label_names)
    test_seconds = time.perf_counter() - test_started
    _warn_if_one_label(predictions, label_names, chosen.name, train_options)

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
        **train_options.quantization,  # evaluate/predict reload the backbone quantized the same way
        "data": data_name,
        "data_schema": schema.to_dict(),
        "data_options": data_options,
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
        "data_schema": schema.to_dict(),
        "seed": seed,
        "shots": shots,
        "missing_rate": missing_rate,
        "config": dataclasses.asdict(train_options),
        "sizes": {split: len(dataset) for split, dataset in splits.items()},
        **({"full_sizes": full_sizes} if (dev_size, test_size) != (None, None) else {}),
        "base_run": None if base_run is None else os.fspath(base_run),
        "epochs_trained": _epochs_trained(fitted.log_history),
        "history": fitted.log_history,  # per-epoch training logs (loss terms, mean T) and dev metrics
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
    text_column: str | Sequence[str] | None = None,
    label_column: Optional[str] = None,
    tokens_column: Optional[str] = None,
    tags_column: Optional[str] = None,
    label_names: str | Sequence[str] | None = None,
    skip_empty: Optional[bool] = None,
) -> dict:
    """Score a saved run on a split of `data`: the same metrics as `train` writes, labels matched by name.

    `missing_rate` drops that fraction of the words of every example first (seeded by `seed`), to measure how a
    model trained on complete data copes with incomplete inputs. Returns `{"adapter", "data", "split",
    "missing_rate", "examples", "metrics"}`; with `reliability_path`, also draws the reliability diagram there.
    The column options read `data` as in `train`; when none is given and `data` is what the run was trained on,
    those the run was trained with are used.
    """
    check_fraction(missing_rate, "missing_rate", closed=True)
    check_seed(seed)
    check_int(batch_size, "batch_size")
    if not isinstance(split, str) or not split:
        raise ValueError(f"split={split!r}: name a split of the data, e.g. 'test'.")
    if reliability_path is not None:
        check_output_file(reliability_path, "reliability_path", IMAGE_SUFFIXES)
    run = load_run(adapter_dir)
    data_options = _given_data_options(
        text_column=text_column, label_column=label_column, tokens_column=tokens_column, tags_column=tags_column,
        label_names=label_names, skip_empty=skip_empty,
    )
    if not data_options and _portable_name(data) == run.info.get("data"):
        data_options = dict(run.info.get("data_options") or {})  # the training data, read as in training
    splits, schema = load_data(data, **data_options)
    if schema.task_type != run.task_type:
        raise ValueError(
            f"{describe_data(data)} is a {schema.task_type} data set but the adapter in {adapter_dir} was trained for "
            f"{run.task_type}; evaluate it on data of its own task."
        )
    trained_pair = len((run.info.get("data_schema") or {}).get("text_columns") or ()) == 2
    if schema.task_type == SEQ_CLS and schema.is_pair != trained_pair:
        raise ValueError(
            f"The adapter in {adapter_dir} was trained on {'sentence pairs' if trained_pair else 'single texts'} but "
            f"{describe_data(data)} was read as {'pairs' if schema.is_pair else 'single texts'} (text columns "
            f"{[schema.source_columns.get(c, c) for c in schema.text_columns]}); pass text_column= "
            f"(--text-column) with {'two columns' if trained_pair else 'one column'}."
        )
    if split not in splits:
        raise ValueError(f"{data} has no split {split!r}; it has {list(splits)}.")
    with _datasets_progress(progress):
        dataset = _relabel(splits[split], run.label_names, data)
        if missing_rate:
            dataset = corrupt_missing(dataset, missing_rate, seed, schema=schema)
        tokenized = tokenize_dataset(dataset, run.tokenizer, run.info["max_length"], schema=schema)
    predictions = run.method.predict(
        run.fitted, dev_batches(tokenized, run.task_type, run.tokenizer, batch_size), progress=progress
    )
    if reliability_path is not None:
        save_reliability_diagram(
            *confidence_and_correctness(predictions), reliability_path,
            title=f"{run.method.name} on {_short_name(data)} ({split})",
        )
    return {
        "adapter": os.fspath(adapter_dir),
        "data": describe_data(data),
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
    check_int(batch_size, "batch_size")
    if not texts:
        raise ValueError("Nothing to predict: pass at least one text.")
    for number, text in enumerate(texts, start=1):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"Text {number} is empty; pass non-empty texts to predict.")
    run = load_run(adapter_dir)
    if run.task_type == SEQ_CLS and len((run.info.get("data_schema") or {}).get("text_columns") or ()) == 2:
        pairs = [text.split("\t", 1) for text in texts]
        for number, pair in enumerate(pairs, start=1):
            if len(pair) != 2 or not all(part.strip() for part in pair):
                raise ValueError(
                    f"Text {number}: this run classifies sentence pairs; give each as the two texts joined by a TAB."
                )
        dataset = Dataset.from_dict({"text": [a for a, _ in pairs], "text_pair": [b for _, b in pairs],
                                     "label": [0] * len(texts)})
        words = None
    elif run.task_type == SEQ_CLS:
        dataset = Dataset.from_dict({"text": list(texts), "label": [0] * len(texts)})
        words = None
    else:
        words = [WORD_PATTERN.findall(text) for text in texts]
        dataset = Dataset.from_dict({"tokens": words, "ner_tags": [[0] * len(w) for w in words]})
    with _datasets_progress(shown=False):  # a few rows of an interactive prediction
        tokenized = tokenize_dataset(dataset, run.tokenizer, run.info["max_length"])
    predictions = run.method.predict(
        run.fitted, dev_batches(tokenized, run.task_type, run.tokenizer, batch_size), progress=False
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
    if not isinstance(info, dict):
        raise ValueError(f"{info_path} holds a JSON {type(info).__name__}, not an object; re-run `peft-umema train`.")
    missing = [key for key in ("method", "backbone", "task_type", "label_names", "max_length") if key not in info]
    if missing:
        raise ValueError(f"{info_path} lacks {missing}; re-run `peft-umema train` to write a complete one.")
    check_run_info(info, info_path)
    return info


def load_run(adapter_dir: str | os.PathLike) -> LoadedRun:
    """Rebuild a run from its folder alone (plus its backbone, named in `umema_run.json`)."""
    info = read_run_info(adapter_dir)
    folder = Path(adapter_dir)
    try:
        method = get_method(info["method"])
    except ValueError as error:  # written by a newer version, or edited
        raise ValueError(f"{folder / RUN_INFO_NAME}: {error}") from None
    check_run_files(folder, info)  # a damaged file, by name, before torch or peft trip on it
    check_backbone(info["backbone"], named_in=folder / RUN_INFO_NAME)
    tokenizer = load_tokenizer(folder, where=f"the run folder {folder}", fix=REPORT_FIXES)
    with loading_run(folder, method.name):
        fitted = method.load(folder, info)
    return LoadedRun(method=method, fitted=fitted, tokenizer=tokenizer, info=info)


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


def _warn_if_one_label(predictions: Predictions, label_names: Sequence[str], method: str,
                       options: TrainOptions) -> None:
    """A model that gives every test example (every word) the same label has not learned the task, and its
    calibration scores describe a constant predictor: say so, and what to change."""
    predicted = np.unique(np.concatenate([np.reshape(np.argmax(probs, -1), -1) for probs in predictions.probs]))
    if len(predicted) == 1 and len(label_names) > 1:
        warnings.warn(
            f"{method} predicted {label_names[int(predicted[0])]!r} for every test "
            f"{'example' if np.ndim(predictions.probs[0]) == 1 else 'word'}: it did not learn the task in "
            f"{options.epochs:g} epochs at learning rate {options.learning_rate:g}. Train longer (--epochs; early "
            "stopping keeps the best epoch), with more shots, or at another learning rate before comparing scores.",
            stacklevel=3,
        )


def _base_fit(method: Method, base_run, backbone: str, data: str, shots, seed: int,
              options: TrainOptions) -> tuple[Fitted, float]:
    """The fit of `base_run` for `method` to start from, and its training seconds; checks that it is the fit
    `method` would have made itself (same base method, backbone, data, subset, seed and training options)."""
    from .baseline_methods import DerivedMethod

    if not isinstance(method, DerivedMethod):
        raise ValueError(f"base_run is for methods built on another's fit (lora+ts, mcdropout, ...); {method.name!r} "
                         "trains its own model.")
    base_method = method.base_method()
    metrics_path = Path(base_run) / METRICS_NAME
    info = read_run_info(base_run)
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{base_run} has no {METRICS_NAME}; pass a finished run folder as base_run.")
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    expected = {"method": base_method.name, "backbone": backbone, "data": data, "shots": shots, "seed": seed,
                "config": dataclasses.asdict(options)}
    found = {"method": info["method"], "backbone": info["backbone"], "data": info.get("data"),
             "shots": metrics.get("shots"), "seed": metrics.get("seed"), "config": metrics.get("config")}
    differing = sorted(key for key in expected if json_safe(expected[key]) != json_safe(found[key]))
    if differing:
        raise ValueError(
            f"base_run {base_run} is not the {base_method.name!r} fit {method.name!r} starts from: its "
            + "; ".join(f"{key} is {found[key]!r}, not {expected[key]!r}" for key in differing)
            + ". Pass the run of the same backbone, data, shots, seed and options, or leave base_run out to train."
        )
    with loading_run(Path(base_run), base_method.name):
        fitted = base_method.load(Path(base_run), info)
    fitted.model.train()
    for name, parameter in fitted.model.named_parameters():  # trainable as right after training
        parameter.requires_grad_(any(part in name for part in ("lora_", "modules_to_save")))
    fitted.log_history = list(metrics.get("history") or [])
    return fitted, float((metrics.get("timings") or {}).get("fit_seconds") or 0.0)


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
    if isinstance(data, (Dataset, datasets.DatasetDict)):
        return type(data).__name__
    return Path(os.fspath(data)).name


def _given_data_options(**values) -> dict:
    """The data options a caller gave (not None, and skip_empty only when true)."""
    return {name: value for name, value in values.items() if value is not None and value is not False}


def _portable_name(name_or_path: str | os.PathLike) -> str:
    """Local paths become absolute, so that a run folder works from any working directory."""
    if isinstance(name_or_path, (Dataset, datasets.DatasetDict)):
        return describe_data(name_or_path)
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

