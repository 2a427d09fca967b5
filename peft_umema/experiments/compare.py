"""Compare methods on one data set and backbone over several seeds, on equal terms.

Every method of a seed trains on the same k-shot subset, selects on the same dev split and is scored on the same test
split. `lora`, the post-hoc methods (`lora+ts`, `mcdropout`, `adue`, `laplace`) and `ensemble` (as its member 0)
share one LoRA fit per seed, and `multiswag` starts from the `swag` fit: methods differ only in what they add, and
the comparison trains LoRA once where it would train it six times.

The output folder gets `comparison.md` (mean +- std over seeds), `comparison.json` (every number of every seed), one
reliability diagram per method and one overlay. The table and JSON are rewritten after every run and the diagrams
after every seed, so that a failure or an interruption loses little.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.loaders import SEQ_CLS, describe_data, load_data
from ..data.preprocessing import evaluation_subset, k_shot_subset, tokenize_dataset
from ..evaluation.reliability import (
    save_reliability_comparison,
    save_reliability_diagram,
)
from .baseline_methods import BaselineMethod, DerivedMethod, configured_method
from .checks import (
    BACKBONE_TOKENIZER_FIX,
    check_backbone,
    check_int,
    check_max_length,
    check_output_dir,
    check_rank,
    check_seed,
    load_tokenizer,
)
from .methods import (
    Fitted,
    Method,
    RunSetup,
    TrainOptions,
    confidence_and_correctness,
    data_collator,
    get_method,
    own_confidence_score,
    score_predictions,
    write_json,
)
from .runs import CHECKPOINTS_NAME, DEFAULT_MODEL
from .verdict import umema_verdict

DEFAULT_OUTPUT_DIR = "umema-comparison"
TABLE_NAME = "comparison.md"
RESULTS_NAME = "comparison.json"
OVERLAY_NAME = "reliability_overlay.png"


@dataclasses.dataclass(frozen=True)
class Column:
    key: str
    header: str
    digits: int
    spread: bool = True  # show the std (parameter counts do not vary with the seed)


def _columns(task_type: str) -> tuple[Column, ...]:
    token_columns = () if task_type == SEQ_CLS else (Column("entity_ece", "Entity-token ECE ↓", 3),)
    task_metric = Column("accuracy", "Accuracy ↑", 3) if task_type == SEQ_CLS else Column("f1", "Span F1 ↑", 3)
    return (
        task_metric,
        Column("ece", "ECE ↓", 3),
        *token_columns,
        Column("nll", "NLL ↓", 3),
        Column("brier", "Brier ↓", 3),
        Column("auroc_error", "Error AUROC ↑", 3),
        Column("aurc", "AURC ↓", 3),
        Column("fit_seconds", "Train time (s)", 0),
        Column("trainable_parameters", "Trainable params", 0, spread=False),
    )


def compare(
    methods: Sequence[str],
    data: str | os.PathLike,
    shots: Optional[int],
    seeds: Sequence[int],
    *,
    model: str = DEFAULT_MODEL,
    output_dir: str | os.PathLike = DEFAULT_OUTPUT_DIR,
    method_options: Optional[Mapping[str, Mapping[str, Any]]] = None,
    dev_size: Optional[int] = None,
    test_size: Optional[int] = None,
    raise_errors: bool = False,
    text_column: str | Sequence[str] | None = None,
    label_column: Optional[str] = None,
    tokens_column: Optional[str] = None,
    tags_column: Optional[str] = None,
    label_names: str | Sequence[str] | None = None,
    skip_empty: bool = False,
    **train_options,
) -> list[dict]:
    """Run every method under every seed on `data` with backbone `model`, and write the comparison to `output_dir`.

    Args:
        methods: registered method names (`umema`, `lora`, `lora+ts`, `mcdropout`, `ensemble`, `swag`,
            `multiswag`, `adue`, `laplace`).
        data: benchmark name or path, as for `train`.
        shots: training examples per seed (a seeded, stratified subset, the same for every method); None: all.
        seeds: one run of every method per seed.
        model: backbone name, hub name or folder.
        output_dir: where `comparison.md`, `comparison.json` and the reliability diagrams go.
        method_options: options per method name, e.g. `{"mcdropout": {"samples": 20}}`.
        dev_size, test_size: score on a fixed seeded subset of this many dev / test examples (the same for every
            method and seed), to bound the cost of sampling methods on a CPU; None: the whole split.
        raise_errors: stop at the first run that fails, with its traceback (`peft-umema compare --debug`), instead
            of recording the error in the table and going on.
        text_column, label_column, tokens_column, tags_column, label_names, skip_empty: how to read your own data,
            as for `train` (see `peft_umema.data.load_data`).
        **train_options: `TrainOptions` fields shared by all methods (epochs, learning_rate, max_length, ...).

    Returns:
        The table: one dict per method with `method`, `seeds` (how many succeeded), `errors` (per failed seed) and,
        per column, `{"mean", "std"}` over the successful seeds.
    """
    methods, seeds = list(methods), list(seeds)
    _check_arguments(methods, seeds, method_options)
    options = _train_options(train_options)
    chosen = {name: configured_method(name, (method_options or {}).get(name)) for name in methods}
    for seed in seeds:
        check_seed(seed, "seeds")
    for name, size in (("dev_size", dev_size), ("test_size", test_size)):
        if size is not None:
            check_int(size, name)
    if shots is not None:
        check_int(shots, "shots")
    output_dir = check_output_dir(output_dir)
    backbone = check_backbone(model)  # before the data: a wrong name fails at once
    check_max_length(options.max_length, backbone)
    check_rank(options.rank, backbone)
    output_dir.mkdir(parents=True, exist_ok=True)

    splits, schema = load_data(
        data, text_column=text_column, label_column=label_column, tokens_column=tokens_column,
        tags_column=tags_column, label_names=label_names, skip_empty=skip_empty,
    )
    task_type, label_names = schema.task_type, list(schema.label_names)
    tokenizer = load_tokenizer(backbone.path, where=f"the backbone {model}", fix=BACKBONE_TOKENIZER_FIX)
    dev = tokenize_dataset(evaluation_subset(splits["validation"], dev_size), tokenizer, options.max_length, schema=schema)
    test = tokenize_dataset(evaluation_subset(splits["test"], test_size), tokenizer, options.max_length, schema=schema)
    test_batches = DataLoader(test, batch_size=2 * options.batch_size, collate_fn=data_collator(task_type, tokenizer))
    results = _Results(
        output_dir,
        settings={
            "data": describe_data(data),
            "model": model,
            "task_type": task_type,
            "shots": shots,
            "seeds": seeds,
            "sizes": {"dev": len(dev), "test": len(test), "full_test": len(splits["test"])},
            "train_options": dataclasses.asdict(options),
            "method_options": {
                name: _options_of(method) for name, method in chosen.items() if isinstance(method, BaselineMethod)
            },
        },
        methods=methods,
    )

    with tqdm(total=len(seeds) * len(methods), desc="Comparing", disable=not options.progress) as bar:
        for seed in seeds:
            train = splits["train"] if shots is None else k_shot_subset(splits["train"], shots, seed, schema=schema)
            setup = RunSetup(
                backbone=model,
                task_type=task_type,
                label_names=label_names,
                tokenizer=tokenizer,
                train_dataset=tokenize_dataset(train, tokenizer, options.max_length, schema=schema),
                eval_dataset=dev,
                options=options,
                seed=seed,
                work_dir=output_dir / CHECKPOINTS_NAME,
            )
            fits = _SeedFits(setup)
            for name, method in chosen.items():
                bar.set_postfix_str(f"seed {seed}: {name}")
                try:
                    record, pooled = _run(method, fits, test_batches)
                except Exception as error:  # one method's failure must not cost the others' results
                    if raise_errors:
                        raise
                    record, pooled = {"error": f"{type(error).__name__}: {error}"}, None
                    tqdm.write(f"{name} failed on seed {seed}: {record['error']}")
                results.add({"method": name, "seed": seed, **record}, pooled)
                bar.update()
            results.write_diagrams()
    return results.summary()


def _run(method: Method, fits: _SeedFits, test_batches: DataLoader) -> tuple[dict, tuple]:
    """Fit (or take the seed's fit), predict the test split and score it: one method, one seed."""
    fitted, fit_seconds, base_seconds = fits.fit(method)
    started = time.perf_counter()
    predictions = method.predict(fitted, test_batches, progress=fits.setup.options.progress)
    test_seconds = time.perf_counter() - started
    trainable, total = method.parameter_counts(fitted)
    record = {
        "test": score_predictions(predictions, fits.setup.task_type, fits.setup.label_names),
        "method_details": method.method_details(fitted, predictions),
        "fit_seconds": round(fit_seconds, 2),
        "base_fit_seconds": None if base_seconds is None else round(base_seconds, 2),
        "test_seconds": round(test_seconds, 2),
        "trainable_parameters": trainable,
        "total_parameters": total,
    }
    return record, confidence_and_correctness(predictions)


class _SeedFits:
    """The fits of one seed, each made once: a derived method starts from the fit of its base found here (the `lora`
    fit shared by `lora`, the post-hoc methods and `ensemble`; the `swag` fit that is run 0 of `multiswag`).

    Keyed by method name and options; a failed fit is kept too, so that what depends on it fails without retraining.
    """

    def __init__(self, setup: RunSetup):
        self.setup = setup
        self.outcomes: dict[tuple[str, str], Any] = {}

    def fit(self, method: Method) -> tuple[Fitted, float, Optional[float]]:
        """(fitted, seconds including the base fit, seconds of the base fit or None)."""
        key = (method.name, json.dumps(_options_of(method), sort_keys=True))
        if key not in self.outcomes:
            try:
                self.outcomes[key] = self._fit(method)
            except Exception as error:
                self.outcomes[key] = error
        outcome = self.outcomes[key]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _fit(self, method: Method) -> tuple[Fitted, float, Optional[float]]:
        base_fitted, base_seconds = None, None
        if isinstance(method, DerivedMethod):
            base = method.base_method()
            try:
                base_fitted, base_seconds, _ = self.fit(base)
            except Exception as error:
                raise RuntimeError(f"its base method {base.name!r} failed: {error}") from error
        started = time.perf_counter()
        try:
            fitted = method.fit(self.setup) if base_fitted is None else method.fit_on(base_fitted, self.setup)
        finally:
            shutil.rmtree(self.setup.work_dir, ignore_errors=True)  # the Trainer's checkpoints: one fit's only
        return fitted, (base_seconds or 0.0) + time.perf_counter() - started, base_seconds


def _options_of(method: Method) -> dict:
    return dataclasses.asdict(method.options) if isinstance(method, BaselineMethod) else {}


class _Results:
    """Records of every run, and the table, JSON and diagrams written from them."""

    def __init__(self, output_dir: Path, settings: dict, methods: list[str]):
        self.output_dir = output_dir
        self.settings = settings
        self.methods = methods
        self.columns = _columns(settings["task_type"])
        self.records: list[dict] = []
        self.pooled: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [] for name in methods}

    def add(self, record: dict, pooled: Optional[tuple[np.ndarray, np.ndarray]]) -> None:
        """Keep one run's record and (confidence, correct) pairs, and rewrite the table and JSON."""
        self.records.append(record)
        if pooled is not None:
            self.pooled[record["method"]].append(pooled)
        write_json(self.output_dir / RESULTS_NAME, {**self.settings, "runs": self.records, "summary": self.summary()})
        (self.output_dir / TABLE_NAME).write_text(self.markdown(), encoding="utf-8")

    def summary(self) -> list[dict]:
        rows = []
        for name in self.methods:
            runs = [record for record in self.records if record["method"] == name]
            succeeded = [record for record in runs if "error" not in record]
            row = {
                "method": name,
                "seeds": len(succeeded),
                "errors": [{"seed": record["seed"], "error": record["error"]} for record in runs if "error" in record],
            }
            for column in self.columns:
                row[column.key] = _mean_and_std([_column_value(record, column.key) for record in succeeded])
            rows.append(row)
        return rows

    def markdown(self) -> str:
        settings = self.settings
        sizes = settings["sizes"]
        test_note = "" if sizes["test"] == sizes["full_test"] else f" (a fixed seeded subset of {sizes['full_test']})"
        shots = "all" if settings["shots"] is None else settings["shots"]
        lines = [
            f"# {Path(settings['data']).name}: {', '.join(self.methods)}",
            "",
            f"Backbone `{settings['model']}`; {shots} training examples per seed (the same seeded subset for every "
            f"method), seeds {', '.join(map(str, settings['seeds']))}; dev {sizes['dev']} examples, test "
            f"{sizes['test']}{test_note}. Cells: mean ± sample standard deviation over the seeds that succeeded.",
            "",
            "| Method | " + " | ".join(column.header for column in self.columns) + " | Notes |",
            "|---|" + "---:|" * len(self.columns) + "---|",
        ]
        for row in self.summary():
            cells = [_format_cell(row[column.key], column) for column in self.columns]
            notes = "; ".join(f"seed {error['seed']} failed: {error['error']}" for error in row["errors"])
            lines.append(f"| {row['method']} | " + " | ".join(cells) + f" | {_escape(notes)} |")
        tests: dict[str, dict[int, dict]] = {}
        for record in self.records:
            if "error" not in record:
                tests.setdefault(record["method"], {})[record["seed"]] = record["test"]
        verdict = umema_verdict(tests, settings["task_type"])
        lines += ["", verdict] if verdict else []
        lines += [
            "",
            "Error AUROC (is a wrong prediction less confident than a right one) and AURC (area under the "
            "risk-coverage curve) rank predictions by each method's own confidence: UM's for `umema`, AdUE's for "
            "`adue`, the maximum probability for the others; ECE, NLL and Brier score the predicted probabilities. "
            "Train time "
            "includes the fit a method starts from (shared within a seed): the LoRA fit of `lora+ts`, `mcdropout`, "
            "`adue`, `laplace` and `ensemble` (its member 0), the SWAG fit of `multiswag` (its run 0). "
            "Reliability diagrams (of the maximum probability) pool the test predictions of all seeds: "
            + ", ".join(f"[{name}]({_diagram_name(name)})" for name in self.methods if self.pooled[name])
            + f"; all methods overlaid: [{OVERLAY_NAME}]({OVERLAY_NAME}).",
            "",
        ]
        return "\n".join(lines)

    def write_diagrams(self) -> None:
        """One reliability diagram per method and the overlay, each over the test predictions of all seeds so far."""
        data_name = Path(self.settings["data"]).name
        pooled = {name: _concatenated(runs) for name, runs in self.pooled.items() if runs}
        for name, (confidences, correct) in pooled.items():
            title = f"{name} on {data_name} (test, {len(self.pooled[name])} seeds pooled)"
            save_reliability_diagram(confidences, correct, self.output_dir / _diagram_name(name), title=title)
        if pooled:
            title = f"{data_name} (test, seeds pooled)"
            save_reliability_comparison(pooled, self.output_dir / OVERLAY_NAME, title=title)


def _column_value(record: dict, key: str) -> Optional[float]:
    """A column's value in one run; the error-detection columns use the method's own confidence where it has one."""
    if key in ("fit_seconds", "trainable_parameters"):
        return record[key]
    return own_confidence_score(record["test"], key)


def _mean_and_std(values: list[Optional[float]]) -> dict[str, Optional[float]]:
    """Over the values that exist (an AUROC is null when a run made no error); std is the sample std (n - 1)."""
    present = [float(value) for value in values if value is not None and not math.isnan(value)]
    if not present:
        return {"mean": None, "std": None}
    return {"mean": float(np.mean(present)), "std": float(np.std(present, ddof=1)) if len(present) > 1 else None}


def _format_cell(value: dict, column: Column) -> str:
    if value["mean"] is None:
        return "—"
    cell = f"{value['mean']:,.{column.digits}f}"
    if value["std"] is None or not column.spread:
        return cell
    return f"{cell} ± {value['std']:,.{column.digits}f}"


def _escape(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())


def _concatenated(runs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([confidences for confidences, _ in runs]), np.concatenate([correct for _, correct in runs])


def _diagram_name(method: str) -> str:
    return f"reliability_{method}.png"


def _train_options(options: dict) -> TrainOptions:
    names = [field.name for field in dataclasses.fields(TrainOptions)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(f"Unknown training option(s) {unknown}; valid ones: {names}.")
    return TrainOptions(**options)


def _check_arguments(methods: list[str], seeds: list, method_options: Optional[Mapping]) -> None:
    if not methods:
        raise ValueError("Name at least one method to compare.")
    if len(set(methods)) != len(methods):
        raise ValueError(f"Methods repeat: {methods}.")
    if not seeds:
        raise ValueError("Give at least one seed.")
    if any(isinstance(seed, bool) or not isinstance(seed, int) for seed in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"Seeds must be distinct integers, got {seeds}.")
    for name in methods:
        get_method(name)  # an unknown name fails here, before any training
    stray = sorted(set(method_options or {}) - set(methods))
    if stray:
        raise ValueError(f"Options given for method(s) {stray}, which are not compared; compared: {methods}.")
