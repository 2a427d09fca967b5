"""`peft-umema reproduce`: the paper's evaluation (section 4) as a resumable grid of cells.

A *cell* is one training run: backbone x data set x shots x seed x method (or ablation variant) x learning rate x
missing rate, plus the shared training options. Every cell has its own folder under `<output-dir>/cells/`; its
`cell.json` is written (atomically, by a rename) only once the run has finished, so a finished cell is skipped on the
next invocation and a killed one, which has no `cell.json`, is redone from scratch. Cells shared by several studies
(the LoRA and UMEMA cells of `main`, `ablation`, `calibration` and `missing` at rate 0) run once.

Studies (the paper's section 4):

- `main`: LoRA, UMEMA and the PEFT baselines that are registered (AdaLoRA, ...) at 200 / 500 / 1000 shots.
- `ablation`: LoRA, +UM, +EMA and full UMEMA.
- `lr`: LoRA and UMEMA at learning rates 5e-5, 1e-4, 2e-4, 5e-4, 1e-3.
- `missing`: LoRA and UMEMA with 0 to 50% of the input words dropped (train, dev and test alike).
- `calibration`: ECE / NLL / Brier at 1000 shots for LoRA, LoRA+TS, MC dropout, ensembles, SWAG, Laplace, AdUE and
  UMEMA, with reliability diagrams pooled over seeds.
- `overhead`: trainable parameters, time per training epoch and peak memory of the four ablation variants, from
  one-epoch cells that run one at a time, each in a fresh process.

Unless `--lr` fixes it, the learning rate of every study but `lr` is chosen on dev for plain LoRA (seed 0, the
largest shot count, per backbone and data set) from `--tune-lrs`, then used for every method alike; epochs are
chosen on dev by early stopping. `--report` rebuilds the Markdown tables, the figures and one JSON per study from
the run folders alone (`cells/*/cell.json` and `plans/<study>.json`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import multiprocessing
import os
import re
import resource
import shlex
import shutil
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import checks
from .verdict import SCORE_TOLERANCE, task_metric, umema_checks, umema_verdict

STUDIES = ("main", "ablation", "lr", "missing", "calibration", "overhead")
TUNE = "tune"  # the pseudo-study of the learning-rate selection cells
TUNE_SEED = 0  # the seed of every tuning cell
PAPER_DATASETS = ("20newsgroups", "semeval2010_task8", "wnut17", "ploner")
PAPER_SHOTS = (200, 500, 1000)
PAPER_SEEDS = (0, 1, 2)
PAPER_LEARNING_RATES = (5e-5, 1e-4, 2e-4, 5e-4, 1e-3)
MISSING_RATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
# Learning rates LoRA is tuned over on dev: the paper's grid's upper half and above, since a small encoder with a new
# head learns slowly at the rates of GPT-2 / Llama (see TrainOptions).
TUNE_LEARNING_RATES = (2e-4, 5e-4, 1e-3, 2e-3, 5e-3)
CALIBRATION_SHOTS = 1000

# Ablation variants: name -> (registered method, use_um, use_ema, label)
VARIANTS = {
    "lora": ("lora", True, True, "LoRA"),
    "+um": ("umema", True, False, "+UM"),
    "+ema": ("umema", False, True, "+EMA"),
    "umema": ("umema", True, True, "UMEMA"),
}
ABLATION_VARIANTS = ("lora", "+um", "+ema", "umema")
CURVE_METHODS = ("lora", "umema")
CALIBRATION_METHODS = ("lora", "lora+ts", "mcdropout", "ensemble", "swag", "laplace", "adue", "umema")
# PEFT baselines of the paper's main table, used where registered (experiments/peft_baselines.py)
PEFT_BASELINES = ("adalora", "lisa", "mixlora")

CELLS_DIR = "cells"
PLANS_DIR = "plans"
CELL_NAME = "cell.json"
ERROR_NAME = "error.json"
LOCK_NAME = ".lock"
RUN_DIR = "run"
PREDICTIONS_NAME = "test_predictions.npz"
LOG_NAME = "cell.log"  # what the cell printed (the Trainer's log lines, warnings)
KEPT_RUN_FILES = ("metrics.json", "umema_run.json", "reliability.png")
# Cells whose run folders keep their adapter: the post-hoc baselines of the same data and seed start from them
BASE_VARIANTS = ("lora",)
CELL_FORMAT = 1


# ----------------------------------------------------------------------------------------------------------------
# Cells
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainingSettings:
    """The training options every cell of an invocation shares (the learning rate is per cell)."""

    epochs: float = 10.0
    patience: int = 3
    batch_size: int = 16
    max_length: int = 128
    rank: int = 8
    max_steps: int = -1
    dev_size: int | None = None  # a fixed seeded subset of dev / test (smoke runs); None: the whole split
    test_size: int | None = None

    def __post_init__(self):
        """A bad value fails when the invocation starts, not once in every cell."""
        checks.check_positive(self.epochs, "--epochs")
        for name in ("patience", "batch_size", "max_length", "rank"):
            checks.check_int(getattr(self, name), _option(name))
        checks.check_int(self.max_steps, "--max-steps", also=(-1,))
        for name in UNSET_IS_UNHASHED:
            size = getattr(self, name)
            if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
                raise ValueError(f"{_option(name)} must be a positive number of examples, got {size}; leave it out "
                                 "to use the whole split.")


def _option(field: str) -> str:
    return "--" + field.replace("_", "-")


UNSET_IS_UNHASHED = ("dev_size", "test_size")


def settings_identity(settings: TrainingSettings | dict) -> dict:
    """The settings as they define a cell: the fields added later (`UNSET_IS_UNHASHED`) only when set, so cells and
    records written before them keep their keys and still match the settings of a new invocation."""
    values = dataclasses.asdict(settings if isinstance(settings, TrainingSettings) else TrainingSettings(**settings))
    return {name: value for name, value in values.items() if not (name in UNSET_IS_UNHASHED and value is None)}


def _settings_key(settings: TrainingSettings | dict) -> str:
    return json.dumps(settings_identity(settings), sort_keys=True)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One training run. `kind` is `train`, or `overhead` for the timing cells (one epoch, run alone)."""

    kind: str
    backbone: str
    data: str
    shots: int
    seed: int
    variant: str
    learning_rate: float
    missing_rate: float
    settings: TrainingSettings

    @property
    def method(self) -> str:
        return VARIANTS[self.variant][0] if self.variant in VARIANTS else self.variant

    @property
    def flags(self) -> dict:
        """use_um / use_ema for the umema variants (other methods ignore them)."""
        if self.variant in VARIANTS:
            _, use_um, use_ema, _ = VARIANTS[self.variant]
            return {"use_um": use_um, "use_ema": use_ema}
        return {}

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "method": self.method}

    @classmethod
    def from_dict(cls, values: dict) -> Cell:
        fields = {field.name for field in dataclasses.fields(cls)}
        kept = {key: value for key, value in values.items() if key in fields}
        kept["settings"] = TrainingSettings(**kept["settings"])
        return cls(**kept)

    @property
    def key(self) -> str:
        """A readable relative folder, with a hash of everything that defines the cell."""
        identity = {**dataclasses.asdict(self), "settings": settings_identity(self.settings)}
        digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
        variant = self.variant.replace("+", "plus-")
        name = (f"{self.kind}-{self.shots}shots-lr{_number_name(self.learning_rate)}-"
                f"miss{_number_name(self.missing_rate)}-seed{self.seed}-{digest}")
        return "/".join((_safe(self.backbone), _safe(self.data), variant, name))


def _number_name(value: float) -> str:
    return f"{value:g}"


def _safe(name: str) -> str:
    short = Path(name).name if ("/" in name or os.sep in name) else name
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", short).strip("-") or "x"


def variant_label(variant: str) -> str:
    return VARIANTS[variant][3] if variant in VARIANTS else variant


def available_methods() -> list[str]:
    """Variant and method names `--methods` accepts."""
    from . import baseline_methods  # noqa: F401  (registers the baselines)
    from .methods import METHODS

    _register_optional_baselines()
    return sorted(set(VARIANTS) | set(METHODS))


def _register_optional_baselines() -> None:
    from . import runs  # noqa: F401  (importing the driver registers every method, AdaLoRA included)


def default_methods(study: str) -> tuple[str, ...]:
    from .methods import METHODS

    _register_optional_baselines()
    if study == "main":
        return ("lora", "umema") + tuple(name for name in PEFT_BASELINES if name in METHODS)
    if study in ("ablation", "overhead"):
        return ABLATION_VARIANTS
    if study == "calibration":
        return CALIBRATION_METHODS
    return CURVE_METHODS


# ----------------------------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Grid:
    """What an invocation asks for; the defaults follow the paper."""

    backbones: Sequence[str] = ("minilm",)
    datasets: Sequence[str] = PAPER_DATASETS
    shots: Sequence[int] = PAPER_SHOTS
    seeds: Sequence[int] = PAPER_SEEDS
    methods: Sequence[str] | None = None  # None: each study's own
    learning_rate: float | None = None  # None: chosen on dev for LoRA
    tune_learning_rates: Sequence[float] = TUNE_LEARNING_RATES
    learning_rates: Sequence[float] = PAPER_LEARNING_RATES
    missing_rates: Sequence[float] = MISSING_RATES
    overhead_epochs: float = 1.0
    settings: TrainingSettings = TrainingSettings()

    def __post_init__(self):
        for name in ("backbones", "datasets", "shots", "seeds"):
            values = list(getattr(self, name))
            if not values:
                raise ValueError(f"--{name} needs at least one value.")
            if len(set(values)) != len(values):
                raise ValueError(f"--{name} repeats a value: {values}.")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.shots):
            raise ValueError(f"shots must be positive integers, got {list(self.shots)}.")
        for seed in self.seeds:
            checks.check_seed(seed, "--seeds")
        for name, option in (("tune_learning_rates", "--tune-lrs"), ("learning_rates", "--learning-rates")):
            if not list(getattr(self, name)):
                raise ValueError(f"{option} needs at least one value.")
            for rate in getattr(self, name):
                checks.check_learning_rate(rate, option)
        if self.learning_rate is not None:
            checks.check_learning_rate(self.learning_rate, "--lr")
        checks.check_positive(self.overhead_epochs, "--overhead-epochs")
        if self.methods is not None:
            known = available_methods()
            unknown = sorted(set(self.methods) - set(known))
            if unknown:
                raise ValueError(f"Unknown method(s) {unknown}; choose from {', '.join(known)}.")
        if any(not 0 <= rate < 1 for rate in self.missing_rates):
            raise ValueError(f"missing rates must be in [0, 1), got {list(self.missing_rates)}.")

    def methods_for(self, study: str) -> tuple[str, ...]:
        return tuple(self.methods) if self.methods else default_methods(study)


def tune_cells(grid: Grid) -> list[Cell]:
    """LoRA at each tuning learning rate, seed `TUNE_SEED` whatever seeds the invocation asks for (so that the
    choice does not depend on them), the largest shot count, missing rate 0."""
    return [
        Cell("train", backbone, data, max(grid.shots), TUNE_SEED, "lora", lr, 0.0, grid.settings)
        for backbone in grid.backbones for data in grid.datasets for lr in grid.tune_learning_rates
    ]


def study_cells(study: str, grid: Grid, chosen_lr: Callable[[str, str], float | None]) -> list[Cell]:
    """The cells of `study`; `chosen_lr(backbone, data)` is the learning rate of the non-`lr` studies (None: not
    known yet, so that backbone and data set are left out)."""
    cells = []
    methods = grid.methods_for(study)
    for backbone in grid.backbones:
        for data in grid.datasets:
            lr = chosen_lr(backbone, data)
            if study == "lr":
                shots_list, lrs, rates = grid.shots, grid.learning_rates, (0.0,)
            elif lr is None:
                continue
            elif study == "missing":
                shots_list, lrs, rates = grid.shots, (lr,), grid.missing_rates
            elif study in ("calibration", "overhead"):
                shots_list, lrs, rates = (_calibration_shots(grid),), (lr,), (0.0,)
            else:
                shots_list, lrs, rates = grid.shots, (lr,), (0.0,)
            kind = "overhead" if study == "overhead" else "train"
            settings = grid.settings
            if kind == "overhead":
                settings = dataclasses.replace(settings, epochs=grid.overhead_epochs, patience=10**6)
            for shots in shots_list:
                for seed in grid.seeds:
                    for variant in methods:
                        for rate_lr in lrs:
                            for rate in rates:
                                cells.append(Cell(kind, backbone, data, shots, seed, variant, rate_lr, rate, settings))
    return cells


def _calibration_shots(grid: Grid) -> int:
    return CALIBRATION_SHOTS if CALIBRATION_SHOTS in grid.shots else max(grid.shots)


STUDY_PRIORITY = {"ablation": 0, "main": 1, "calibration": 2, "missing": 3, "lr": 4, "overhead": 5, TUNE: -1}


def ordered(cells_by_study: dict[str, list[Cell]], grid: Grid) -> list[Cell]:
    """Distinct cells, most informative first: largest shots, then seed, then study (ablation, main, ...)."""
    first_study: dict[Cell, str] = {}
    for study in sorted(cells_by_study, key=STUDY_PRIORITY.get):
        for cell in cells_by_study[study]:
            first_study.setdefault(cell, study)
    data_rank = {data: index for index, data in enumerate(grid.datasets)}
    variant_rank = defaultdict(lambda: 99, {name: index for index, name in enumerate(
        list(ABLATION_VARIANTS) + [m for m in CALIBRATION_METHODS + PEFT_BASELINES if m not in ABLATION_VARIANTS])})

    def rank(cell: Cell):
        return (-cell.shots, cell.seed, STUDY_PRIORITY[first_study[cell]], list(grid.backbones).index(cell.backbone),
                data_rank.get(cell.data, 0), variant_rank[cell.variant], cell.learning_rate, cell.missing_rate)

    return sorted(first_study, key=rank)


# ----------------------------------------------------------------------------------------------------------------
# Running one cell
# ----------------------------------------------------------------------------------------------------------------


def cell_dir(output_dir: Path, cell: Cell) -> Path:
    return output_dir / CELLS_DIR / cell.key


def finished_record(folder: Path) -> dict | None:
    """The cell's record if it finished (a readable `cell.json`), else None."""
    try:
        return json.loads((folder / CELL_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _write_json_atomically(path: Path, content: Any) -> None:
    from .methods import json_safe

    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(json_safe(content), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def _process_identity(pid: int) -> str | None:
    """"<pid> <start time>" of a live process, None for a dead one or a zombie (a killed worker whose parent died
    too is never reaped in a container without an init process)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return str(pid)  # no /proc: trust the pid
    if fields[0] in ("Z", "X"):
        return None
    return f"{pid} {fields[19]}"  # field 22 of stat: start time, so that a reused pid does not count


def _take_lock(folder: Path) -> bool:
    """Claim a cell for this process; False if another live process is running it."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = lock.read_text().strip()
                pid = int(owner.split()[0])
            except (OSError, ValueError, IndexError):
                owner, pid = "", 0
            if pid and pid != os.getpid() and _process_identity(pid) == owner:
                return False
            lock.unlink(missing_ok=True)  # left by a killed run
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(_process_identity(os.getpid()) or str(os.getpid()))
        return True
    return False


class _Capture:
    """Keeps what `runs.train` hands around inside: the fitted model's log and the test predictions.

    The registered method object gets instance attributes that wrap its `fit` (`fit_on` for a method started from
    a base cell's fit) and `predict` for the duration; `train` calls `predict` once after fitting, on the test split.
    """

    def __init__(self, method):
        self.method = method
        self.log_history: list[dict] = []
        self.predictions = None
        self._fitted = False
        self._wrapped = [name for name in ("fit", "fit_on", "predict") if hasattr(method, name)]

    def _capturing(self, fit):
        def capturing_fit(*args):
            fitted = fit(*args)
            self.log_history = list(fitted.log_history)
            self._fitted = True
            return fitted

        return capturing_fit

    def __enter__(self):
        predict = self.method.predict

        def capturing_predict(fitted, batches, progress=True):
            predictions = predict(fitted, batches, progress=progress)
            if self._fitted:
                self.predictions = predictions
            return predictions

        for name in self._wrapped:
            if name != "predict":
                setattr(self.method, name, self._capturing(getattr(self.method, name)))
        self.method.predict = capturing_predict
        return self

    def __exit__(self, *exc):
        for name in self._wrapped:
            delattr(self.method, name)
        return False


def smoke_method_options(cell: Cell) -> dict:
    """Options that differ from a method's registered defaults: none, except that SWAG starts collecting at once in
    runs capped by `--max-steps` (its default, from epoch 1 on, collects nothing in a run shorter than an epoch)."""
    if cell.settings.max_steps > 0 and cell.method in ("swag", "multiswag"):
        return {"start_epoch": 0.0}
    return {}


@contextlib.contextmanager
def _registered(name: str, options: dict):
    """The registered method `name`, replaced for the duration by one with `options` when there are any (`train`
    looks methods up by name; the run folder records the options, so loading it needs no change)."""
    from .baseline_methods import configured_method
    from .methods import METHODS, get_method

    original = get_method(name)
    if not options:
        yield original
        return
    METHODS[name] = configured_method(name, options)
    try:
        yield METHODS[name]
    finally:
        METHODS[name] = original


def _current_rss() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def train_seconds_per_epoch(log_history: list[dict]) -> float | None:
    """The Trainer's training time less its dev evaluations, per epoch trained."""
    final = [entry for entry in log_history if "train_runtime" in entry]
    epochs = [entry["epoch"] for entry in log_history if "epoch" in entry]
    if not final or not epochs or not max(epochs):
        return None
    evaluation = sum(entry.get("eval_runtime", 0.0) for entry in log_history)
    return max(final[-1]["train_runtime"] - evaluation, 0.0) / max(epochs)


def run_cell(cell: Cell, output_dir: Path, *, threads: int | None = None, keep_adapters: bool = False) -> dict:
    """Train and score one cell into its folder and write its `cell.json`; returns {"status", "key", ...}.

    A folder without `cell.json` (a killed or failed run) is emptied first. A failure writes `error.json` instead,
    so that the next invocation retries the cell.
    """
    import torch

    from .runs import train

    _register_optional_baselines()
    folder = cell_dir(output_dir, cell)
    if finished_record(folder) is not None:
        return {"status": "skipped", "key": cell.key}
    if not _take_lock(folder):
        return {"status": "busy", "key": cell.key}
    try:
        for entry in folder.iterdir():
            if entry.name != LOCK_NAME:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        if threads:
            torch.set_num_threads(threads)
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        rss_at_start = _current_rss()
        load_at_start = os.getloadavg()[0]
        started, started_at = time.perf_counter(), _now()
        settings = cell.settings
        method_options = smoke_method_options(cell)
        base_run = base_run_of(cell, output_dir)
        try:
            # line-buffered, so that a long cell's per-epoch log lines can be followed while it runs
            with open(folder / LOG_NAME, "w", encoding="utf-8", buffering=1) as cell_log, \
                    contextlib.redirect_stdout(cell_log), contextlib.redirect_stderr(cell_log), \
                    _registered(cell.method, method_options) as method, _Capture(method) as capture:
                metrics = train(
                    cell.backbone, cell.data, folder / RUN_DIR, method=cell.method, shots=cell.shots, seed=cell.seed,
                    missing_rate=cell.missing_rate, rank=settings.rank, epochs=settings.epochs,
                    learning_rate=cell.learning_rate, batch_size=settings.batch_size, max_length=settings.max_length,
                    patience=settings.patience, max_steps=settings.max_steps, progress=False, base_run=base_run,
                    dev_size=settings.dev_size, test_size=settings.test_size,
                    **cell.flags,
                )
        except Exception as error:
            _write_json_atomically(folder / ERROR_NAME, {
                "cell": cell.to_dict(), "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc(), "finished_at": _now(),
            })
            return {"status": "failed", "key": cell.key, "error": f"{type(error).__name__}: {error}"}
        wall = time.perf_counter() - started
        if capture.predictions is not None:
            from .methods import confidence_and_correctness

            confidences, correct = confidence_and_correctness(capture.predictions)
            np.savez_compressed(folder / PREDICTIONS_NAME, confidence=confidences.astype(np.float32), correct=correct)
        if not keep_adapters and cell.variant not in BASE_VARIANTS:
            for entry in (folder / RUN_DIR).iterdir():
                if entry.name not in KEPT_RUN_FILES:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        record = {
            "format": CELL_FORMAT,
            "key": cell.key,
            "cell": cell.to_dict(),
            "task_type": metrics["task_type"],
            "test": metrics["test"],
            "dev": metrics["dev"],
            "sizes": metrics["sizes"],
            "epochs_trained": metrics["epochs_trained"],
            "trainable_parameters": metrics["trainable_parameters"],
            "total_parameters": metrics["total_parameters"],
            "method_details": metrics["method_details"],
            "method_options": method_options,
            "base_run": None if base_run is None else os.fspath(base_run.relative_to(output_dir)),
            "timings": {
                **metrics["timings"],
                "wall_seconds": round(wall, 2),
                "train_seconds_per_epoch": _rounded(train_seconds_per_epoch(capture.log_history)),
            },
            "memory": {
                "device": "cuda" if cuda else "cpu",
                "accelerator": torch.cuda.get_device_name() if cuda else None,
                "peak_bytes": int(torch.cuda.max_memory_allocated()) if cuda else int(peak_rss),
                "what": "torch.cuda.max_memory_allocated" if cuda else "peak RSS of the cell's process",
                "rss_at_start_bytes": int(rss_at_start),
                "fresh_process": os.environ.get("PEFT_UMEMA_CELL_WORKER") == "1",
            },
            # how busy the whole machine was, since other processes slow a cell down without it knowing
            "machine_load": {"cpus": os.cpu_count(), "load_1min_at_start": round(load_at_start, 2),
                             "load_1min_at_end": round(os.getloadavg()[0], 2)},
            "log_history": capture.log_history,
            "threads": torch.get_num_threads(),
            "started_at": started_at,
            "finished_at": _now(),
            "versions": metrics["versions"],
        }
        (folder / ERROR_NAME).unlink(missing_ok=True)
        _write_json_atomically(folder / CELL_NAME, record)
        return {"status": "done", "key": cell.key, "seconds": round(wall, 1)}
    finally:
        (folder / LOCK_NAME).unlink(missing_ok=True)


def base_run_of(cell: Cell, output_dir: Path) -> Path | None:
    """The finished run folder of the fit `cell`'s method starts from (the `lora` cell of the same backbone, data,
    shots, seed, learning rate and missing rate), or None to train it within the cell."""
    from .baseline_methods import DerivedMethod
    from .methods import get_method

    if cell.kind != "train":
        return None  # timing cells measure the whole method
    method = get_method(cell.method)
    if not isinstance(method, DerivedMethod) or method.base_method().name not in BASE_VARIANTS:
        return None
    base = dataclasses.replace(cell, variant=method.base_method().name)
    folder = cell_dir(output_dir, base)
    run = folder / RUN_DIR
    if finished_record(folder) is None or not any(run.glob("adapter_model.safetensors")):
        return None
    return run


def _rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _worker(cell_values: dict, output_dir: str, threads: int | None, keep_adapters: bool) -> dict:
    """Entry point of a worker process (spawned fresh for every cell)."""
    os.environ["PEFT_UMEMA_CELL_WORKER"] = "1"
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    return run_cell(Cell.from_dict(cell_values), Path(output_dir), threads=threads, keep_adapters=keep_adapters)


def run_cells(
    cells: Sequence[Cell], output_dir: Path, *, jobs: int = 1, threads: int | None = None,
    keep_adapters: bool = False, fresh_process: bool = False, log: Callable[[str], None] = print,
) -> list[dict]:
    """Run the unfinished cells, `jobs` side by side, each in a fresh process when `jobs > 1` or `fresh_process`."""
    todo = [cell for cell in cells if finished_record(cell_dir(output_dir, cell)) is None]
    outcomes = [{"status": "skipped", "key": cell.key} for cell in cells if cell not in todo]
    total = len(todo)
    if not todo:
        return outcomes

    def report(number: int, cell: Cell, outcome: dict) -> None:
        detail = {"done": f"{outcome.get('seconds', 0):.0f} s", "failed": outcome.get("error", ""),
                  "busy": "running elsewhere", "skipped": "already finished"}[outcome["status"]]
        log(f"[{number}/{total}] {outcome['status']}: {cell.key} ({detail})")

    if jobs <= 1 and not fresh_process:
        for number, cell in enumerate(todo, start=1):
            outcome = run_cell(cell, output_dir, threads=threads, keep_adapters=keep_adapters)
            report(number, cell, outcome)
            outcomes.append(outcome)
        return outcomes

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(jobs, 1), mp_context=context,
                                                max_tasks_per_child=1) as pool:
        futures = {
            pool.submit(_worker, cell.to_dict(), os.fspath(output_dir), threads, keep_adapters): cell for cell in todo
        }
        try:
            for number, future in enumerate(concurrent.futures.as_completed(futures), start=1):
                cell = futures[future]
                try:
                    outcome = future.result()
                except Exception as error:  # the worker died (killed, out of memory)
                    outcome = {"status": "failed", "key": cell.key, "error": f"{type(error).__name__}: {error}"}
                report(number, cell, outcome)
                outcomes.append(outcome)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return outcomes


# ----------------------------------------------------------------------------------------------------------------
# Learning-rate selection
# ----------------------------------------------------------------------------------------------------------------


def dev_score(record: dict) -> float | None:
    """The dev selection metric of a finished cell: macro-F1 (sequence tasks) or entity span F1 (token tasks)."""
    name = "macro_f1" if record["task_type"] == "SEQ_CLS" else "f1"
    value = record.get("dev", {}).get(name)
    return None if value is None else float(value)


def tuning_group(cell: dict) -> tuple:
    """What one learning rate is chosen for: backbone, data set, shot count and training settings."""
    return cell["backbone"], cell["data"], cell["shots"], _settings_key(cell["settings"])


def select_learning_rates(records: Iterable[dict], waiting: Collection[tuple] = ()) -> dict[tuple, dict]:
    """Per tuning group (`tuning_group`): the tuning cell's learning rate with the best dev score (ties: the
    smaller rate). A group in `waiting` (a tuning cell of it has neither finished nor failed) is marked
    ``"waiting": True``: its choice is not made yet, since a rate still running might win."""
    candidates: dict[tuple, list] = defaultdict(list)
    for record in records:
        score = dev_score(record)
        if score is not None:
            candidates[tuning_group(record["cell"])].append((record["cell"]["learning_rate"], score))
    selection = {}
    for key, scored in candidates.items():
        best_lr, best = max(sorted(scored), key=lambda pair: pair[1])
        selection[key] = {"learning_rate": best_lr, "dev_score": best, "candidates": dict(sorted(scored)),
                          "waiting": key in waiting}
    return selection


def waiting_tuning_groups(output_dir: Path, cells: Sequence[Cell] | None = None) -> set[tuple]:
    """The tuning groups with a cell that has neither finished nor failed (killed, or running elsewhere): among
    `cells` (an invocation's own tuning cells), or every planned tuning cell (None, the report)."""
    planned = read_plan(output_dir, TUNE)["cells"] if cells is None else {cell.key: cell.to_dict() for cell in cells}
    waiting = set()
    for key, cell in planned.items():
        folder = output_dir / CELLS_DIR / key
        if finished_record(folder) is None and not (folder / ERROR_NAME).is_file():
            waiting.add(tuning_group(cell))
    return waiting


# ----------------------------------------------------------------------------------------------------------------
# Plan files and the whole run
# ----------------------------------------------------------------------------------------------------------------


def _plan_path(output_dir: Path, study: str) -> Path:
    return output_dir / PLANS_DIR / f"{study}.json"


def read_plan(output_dir: Path, study: str) -> dict:
    try:
        return json.loads(_plan_path(output_dir, study).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {"study": study, "cells": {}, "invocations": []}


def _add_to_plan(output_dir: Path, study: str, cells: Sequence[Cell], grid: Grid) -> None:
    plan = read_plan(output_dir, study)
    for cell in cells:
        plan["cells"][cell.key] = cell.to_dict()
    plan["grid"] = _grid_dict(grid)
    _plan_path(output_dir, study).parent.mkdir(parents=True, exist_ok=True)
    _write_json_atomically(_plan_path(output_dir, study), plan)


def _record_invocation(output_dir: Path, study: str, invocation: dict) -> None:
    """Add the invocation to the study's plan, or update it (same id) once it has finished."""
    plan = read_plan(output_dir, study)
    plan["invocations"] = [entry for entry in plan["invocations"] if entry.get("id") != invocation["id"]]
    plan["invocations"].append(dict(invocation))
    _write_json_atomically(_plan_path(output_dir, study), plan)


def _grid_dict(grid: Grid) -> dict:
    values = dataclasses.asdict(grid)
    return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}


def all_records(output_dir: Path) -> dict[str, dict]:
    """Every finished cell under `output_dir`, by key."""
    records = {}
    for path in sorted((output_dir / CELLS_DIR).glob(f"**/{CELL_NAME}")):
        record = finished_record(path.parent)
        if record is not None:
            records[record["key"]] = record
    return records


def reproduce(
    studies: Sequence[str],
    grid: Grid,
    output_dir: str | os.PathLike,
    *,
    jobs: int = 1,
    threads: int | None = None,
    keep_adapters: bool = False,
    dry_run: bool = False,
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Plan the cells of `studies`, print the plan, run what is unfinished, and record the invocation.

    Returns {"planned": n, "ran": n, "skipped": n, "failed": [...], "pending": [...]}.
    """
    studies = _expand_studies(studies)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if threads is None:
        from_environment = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(from_environment) if from_environment.isdigit() and int(from_environment) > 0 else max(
            1, (os.cpu_count() or 1) // max(jobs, 1))
    started, started_at = time.perf_counter(), _now()
    invocation = {
        "id": f"{started_at} {os.getpid()}",
        "command": command or "reproduce(...)",
        "started_at": started_at,
        "finished_at": None,  # stays None if the invocation is killed
        "wall_seconds": None,
        "jobs": jobs,
        "threads_per_job": threads,
        "studies": list(studies),
    }
    needs_tuning = grid.learning_rate is None and any(study != "lr" for study in studies)

    def chosen_lr_function():
        if grid.learning_rate is not None:
            return lambda backbone, data: grid.learning_rate
        planned = read_plan(output_dir, TUNE)["cells"]
        selection = select_learning_rates(
            (record for key, record in all_records(output_dir).items() if key in planned),
            waiting_tuning_groups(output_dir, tuning),
        )
        settings_key = _settings_key(grid.settings)

        def chosen(backbone, data):
            picked = selection.get((backbone, data, max(grid.shots), settings_key))
            return None if picked is None or picked["waiting"] else picked["learning_rate"]

        return chosen

    outcomes: list[dict] = []
    tuning = tune_cells(grid) if needs_tuning else []
    chosen_lr = chosen_lr_function()
    by_study = {study: study_cells(study, grid, chosen_lr) for study in studies}
    pending = [(b, d) for b in grid.backbones for d in grid.datasets if needs_tuning and chosen_lr(b, d) is None]
    _print_plan(log, output_dir, tuning, by_study, grid, pending)
    if dry_run:
        return {"planned": sum(map(len, by_study.values())) + len(tuning), "ran": 0, "skipped": 0,
                "failed": [], "pending": pending}

    if tuning:
        _add_to_plan(output_dir, TUNE, tuning, grid)  # after the dry run, which writes nothing
        log(f"Choosing the learning rate on dev: {len(tuning)} LoRA cells.")
        outcomes += run_cells(tuning, output_dir, jobs=jobs, threads=threads, keep_adapters=keep_adapters, log=log)
        chosen_lr = chosen_lr_function()  # again, now that the tuning cells have run
        by_study = {study: study_cells(study, grid, chosen_lr) for study in studies}
        pending = [(b, d) for b in grid.backbones for d in grid.datasets if chosen_lr(b, d) is None]
        for backbone, data in pending:
            log(f"No learning rate chosen for {backbone} on {data} (its tuning cells failed, or still run "
                "elsewhere): its cells wait.")
    for study, cells in by_study.items():
        _add_to_plan(output_dir, study, cells, grid)
    for study in set(by_study) | ({TUNE} if tuning else set()):
        _record_invocation(output_dir, study, invocation)

    training = ordered({study: cells for study, cells in by_study.items() if study != "overhead"}, grid)
    outcomes += run_cells(training, output_dir, jobs=jobs, threads=threads, keep_adapters=keep_adapters, log=log)
    if "overhead" in by_study:
        log("Overhead cells: one at a time, each in a fresh process.")
        overhead = ordered({"overhead": by_study["overhead"]}, grid)
        outcomes += run_cells(overhead, output_dir, jobs=1, threads=threads, keep_adapters=keep_adapters,
                              fresh_process=True, log=log)

    wall = time.perf_counter() - started
    invocation.update(finished_at=_now(), wall_seconds=round(wall, 1))
    for study in set(by_study) | ({TUNE} if tuning else set()):
        _record_invocation(output_dir, study, invocation)
    counts = defaultdict(int)
    for outcome in outcomes:
        counts[outcome["status"]] += 1
    summary = {
        "planned": len({o["key"] for o in outcomes}),
        "ran": counts["done"],
        "skipped": counts["skipped"],
        "busy": counts["busy"],
        "failed": [o for o in outcomes if o["status"] == "failed"],
        "pending": pending,
        "wall_seconds": round(wall, 1),
    }
    log(f"Finished in {_duration(wall)}: {summary['ran']} cells run, {summary['skipped']} already finished, "
        f"{len(summary['failed'])} failed, {summary['busy']} running elsewhere.")
    return summary


def _expand_studies(studies: Sequence[str]) -> list[str]:
    chosen = []
    for study in studies:
        for name in (STUDIES if study == "all" else (study,)):
            if name not in STUDIES:
                raise ValueError(f"Unknown study {name!r}; choose from {', '.join(STUDIES)} or all.")
            if name not in chosen:
                chosen.append(name)
    if not chosen:
        raise ValueError("Name at least one study.")
    return chosen


def _print_plan(log, output_dir: Path, tuning, by_study, grid: Grid, pending) -> None:
    distinct = set(tuning) | {cell for cells in by_study.values() for cell in cells}
    done = {cell for cell in distinct if finished_record(cell_dir(output_dir, cell)) is not None}
    log(f"Plan: {len(distinct)} distinct cells in {output_dir / CELLS_DIR} ({len(done)} finished, "
        f"{len(distinct) - len(done)} to run).")
    if tuning:
        log(f"  {TUNE}: {len(tuning)} cells: lora at lr {', '.join(map(_number_name, grid.tune_learning_rates))}, "
            f"{max(grid.shots)} shots, seed {TUNE_SEED}; the best dev score sets each data set's learning rate")
    for study, cells in by_study.items():
        left = sum(cell not in done for cell in cells)
        variants = sorted({cell.variant for cell in cells}, key=lambda v: list(grid.methods_for(study)).index(v)
                          if v in grid.methods_for(study) else 99)
        log(f"  {study}: {len(cells)} cells ({left} to run): {', '.join(variants) or '-'}")
    for backbone, data in pending:
        log(f"  (cells of {backbone} on {data} other than `lr` are planned once its learning rate is chosen)")


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


# ----------------------------------------------------------------------------------------------------------------
# Report: tables, figures and JSON from the run folders alone
# ----------------------------------------------------------------------------------------------------------------


def _stats(values: Sequence[float | None]) -> dict | None:
    """Mean, sample std and count; one value has no spread, so its std is None (a "± 0.000" would claim one)."""
    values = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"mean": float(np.mean(values)), "std": std, "n": len(values)}


def _cell_text(stats: dict | None, digits: int = 3, expected: int | None = None, scale: float = 1.0) -> str:
    if stats is None:
        return "–"
    text = f"{stats['mean'] * scale:.{digits}f}"
    if stats["std"] is not None:
        text += f" ± {stats['std'] * scale:.{digits}f}"
    if expected is not None and stats["n"] < expected:
        text += f" ({stats['n']}/{expected})"
    return text


def _short_data(name: str) -> str:
    return _safe(name)


@dataclasses.dataclass
class StudyView:
    """One study's planned cells and their finished records."""

    study: str
    plan: dict
    records: dict[str, dict]

    @property
    def cells(self) -> list[Cell]:
        return [Cell.from_dict(values) for values in self.plan["cells"].values()]

    def finished(self) -> list[tuple[Cell, dict]]:
        return [(cell, self.records[cell.key]) for cell in self.cells if cell.key in self.records]

    def groups(self, *fields: str) -> dict[tuple, list[tuple[Cell, dict]]]:
        grouped = defaultdict(list)
        for cell, record in self.finished():
            grouped[tuple(getattr(cell, name) for name in fields)].append((cell, record))
        return grouped


def _task_type_of(view_records: Sequence[tuple[Cell, dict]]) -> str:
    return view_records[0][1]["task_type"] if view_records else "SEQ_CLS"


def report(
    output_dir: str | os.PathLike,
    *,
    report_dir: str | os.PathLike | None = None,
    results_md: str | os.PathLike | None = None,
    protocol_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Rebuild `results.md`, the figures and `protocol/<study>.json` from `output_dir` alone.

    Defaults: `<output_dir>/report/` for the figures, `<report_dir>/results.md`, `<report_dir>/protocol/`.
    Returns {study: the content of its JSON}.
    """
    output_dir = Path(output_dir)
    report_dir = Path(report_dir) if report_dir is not None else output_dir / "report"
    results_md = Path(results_md) if results_md is not None else report_dir / "results.md"
    protocol_dir = Path(protocol_dir) if protocol_dir is not None else report_dir / "protocol"
    figures_dir = report_dir / "figures"
    for folder in (figures_dir, protocol_dir, results_md.parent):
        folder.mkdir(parents=True, exist_ok=True)
    records = all_records(output_dir)
    studies = [study for study in (TUNE, *STUDIES) if _plan_path(output_dir, study).is_file()]
    if not studies:
        raise FileNotFoundError(f"{output_dir} has no {PLANS_DIR}/*.json: run `peft-umema reproduce` into it first.")

    def link(path: Path) -> str:
        return Path(os.path.relpath(path, results_md.parent)).as_posix()

    sections, documents, views = [], {}, {}
    for study in studies:
        view = views[study] = StudyView(study, read_plan(output_dir, study), records)
        builder = _SECTION_BUILDERS[study]
        markdown, summary, figures = builder(view, output_dir, figures_dir)
        markdown += _flat_dev_text(view)
        documents[study] = _study_document(view, summary, figures, output_dir)
        _write_json_atomically(protocol_dir / f"{study}.json", documents[study])
        figure_links = "".join(f"\n- [{path.name}]({link(path)})" for path in figures)
        sections.append(_section_header(view, documents[study]) + markdown
                        + (f"\n\nFigures:{figure_links}\n" if figures else "\n"))
    header = _report_header(records, studies, output_dir, protocol_dir, link)
    glance = _at_a_glance(views["calibration"]) if "calibration" in views else ""
    results_md.write_text(header + glance + "\n".join(sections), encoding="utf-8")
    log(f"Wrote {results_md}, {len(documents)} study JSON files in {protocol_dir} and figures in {figures_dir}.")
    return documents


def _study_document(view: StudyView, summary: Any, figures: list[Path], output_dir: Path) -> dict:
    cells = []
    for cell in view.cells:
        record = view.records.get(cell.key)
        entry = {"key": cell.key, **cell.to_dict(), "status": "finished" if record else _unfinished(output_dir, cell)}
        if record:
            metric, _ = task_metric(record["task_type"])
            entry.update({
                "task_type": record["task_type"],
                "task_metric": metric,
                "test": record["test"],
                "dev": record["dev"],
                "sizes": record["sizes"],
                "epochs_trained": record["epochs_trained"],
                "trainable_parameters": record["trainable_parameters"],
                "total_parameters": record["total_parameters"],
                "timings": record["timings"],
                "memory": record["memory"],
            })
        cells.append(entry)
    finished = sum(entry["status"] == "finished" for entry in cells)
    return {
        "study": view.study,
        "planned_cells": len(cells),
        "finished_cells": finished,
        "complete": finished == len(cells),
        "grid": view.plan.get("grid"),
        "invocations": view.plan.get("invocations", []),
        "cell_seconds": round(sum(entry.get("timings", {}).get("wall_seconds", 0) for entry in cells), 1),
        "summary": summary,
        **({"paper_grid": paper_grid_coverage(view)} if view.study in ("main", "ablation") else {}),
        "flat_dev_cells": flat_dev_cells(view),
        "figures": [path.name for path in figures],
        "cells": cells,
    }


def flat_dev_cells(view: StudyView) -> list[dict]:
    """Finished training cells whose dev task score was the same at every evaluation: the model never changed
    how well it predicts (a token model that found no spans, a sentence model stuck on one class), so early
    stopping ended it without it having learnt; their test scores say so, not what the method can reach."""
    flat = []
    for cell, record in view.finished():
        if cell.kind != "train":
            continue
        metric, _ = task_metric(record["task_type"])
        scores = [entry[f"eval_{metric}"] for entry in record.get("log_history", ()) if f"eval_{metric}" in entry]
        if len(scores) >= 2 and max(scores) - min(scores) <= 1e-12:
            flat.append({"key": cell.key, "task_metric": metric, "dev_score": scores[0], "evaluations": len(scores),
                         "epochs_trained": record.get("epochs_trained"), "test_score": record["test"].get(metric)})
    return flat


def _flat_dev_text(view: StudyView) -> str:
    flat = flat_dev_cells(view)
    if not flat:
        return ""
    lines = [f"- `{entry['key']}`: dev {entry['task_metric']} {_number_text(entry['dev_score'])} at all "
             f"{entry['evaluations']} evaluations, {_number_text(entry['epochs_trained'], 0)} epochs trained; "
             f"test {_number_text(entry['test_score'])}" for entry in flat]
    return (f"\n\n**Cells that never improved on dev** ({len(flat)}): their dev score did not move at any "
            "evaluation, so the model did not learn the task in the epochs it ran (early stopping ends such a cell "
            "after patience + 1 epochs); means that include them measure that, not what the method reaches when it "
            "trains longer.\n\n" + "\n".join(lines))


def _unfinished(output_dir: Path, cell: Cell) -> str:
    folder = cell_dir(output_dir, cell)
    if (folder / ERROR_NAME).is_file():
        return "failed"
    return "running or killed" if folder.is_dir() else "not run"


def _section_header(view: StudyView, document: dict) -> str:
    title = {TUNE: "Learning rate chosen on dev (plain LoRA)", "main": "Main results", "ablation": "Ablation",
             "lr": "Learning-rate sensitivity", "missing": "Missing-information robustness",
             "calibration": "Calibration", "overhead": "Overhead"}[view.study]
    if view.study == "calibration" and view.cells:
        title += f" ({' / '.join(str(shots) for shots in sorted({cell.shots for cell in view.cells}))} shots)"
    lines = [f"## {title} (`{view.study}`)", "",
             f"{document['finished_cells']} of {document['planned_cells']} cells finished; "
             f"{_duration(document['cell_seconds'])} of cell time."]
    for invocation in document["invocations"]:
        if invocation.get("finished_at") is None:
            lines.append(f"- `{invocation['command']}`: started {invocation['started_at']}, did not finish "
                         f"(killed, or still running); its finished cells count above")
            continue
        lines.append(f"- `{invocation['command']}`: {_duration(invocation['wall_seconds'])} wall "
                     f"({invocation['started_at']} to {invocation['finished_at']}, {invocation['jobs']} job(s) x "
                     f"{invocation['threads_per_job']} thread(s))")
    return "\n".join(lines) + "\n\n"


def _report_header(records: dict, studies: list[str], output_dir: Path, protocol_dir: Path, link) -> str:
    versions = next(iter(records.values()))["versions"] if records else {}
    sizes = {}
    for record in records.values():
        sizes.setdefault(_short_data(record["cell"]["data"]), record["sizes"])
    size_text = "; ".join(f"{name}: dev {s.get('validation', 0):,}, test {s.get('test', 0):,}"
                          for name, s in sorted(sizes.items()))
    subsets = sorted({f"dev {settings.get('dev_size') or 'all'}, test {settings.get('test_size') or 'all'}"
                      for settings in (record["cell"]["settings"] for record in records.values())
                      if settings.get("dev_size") or settings.get("test_size")})
    test_text = ("Test scores are on the full official test split of each data set" if not subsets else
                 "Some cells were scored on fixed seeded subsets of dev and test (`--dev-size` / `--test-size`, "
                 f"smoke runs: {'; '.join(subsets)}), so their numbers are not the paper's full-test-set ones")
    return "\n".join([
        "# Reproducing the paper's evaluation (`peft-umema reproduce`)",
        "",
        f"Generated by `peft-umema reproduce --report` from `{output_dir}` on {_now()}; machine-readable results "
        f"(every cell) in [{link(protocol_dir)}/]({link(protocol_dir)}/). Cells: mean ± sample std over seeds (a "
        "single seed shows its value alone); a cell with fewer finished seeds than planned shows (finished/planned). "
        f"{test_text}; the training split "
        "is a seeded, stratified k-shot subset; dev is the official dev split or 10% carved from train where there is "
        "none.",
        "",
        f"Evaluation splits (examples; sentences for token tasks): {size_text or '-'}.",
        f"Versions: {', '.join(f'{k} {v}' for k, v in versions.items()) or '-'}.",
        f"Where the cells ran: {_hardware_text(records)}.",
        "",
    ]) + "\n"


def _hardware_text(records: dict) -> str:
    """Per backbone, how many cells ran on which kind of machine (from each cell's own record)."""
    counts: dict[str, dict[str, int]] = {}
    for record in records.values():
        memory, load = record.get("memory", {}), record.get("machine_load", {})
        if memory.get("device") == "cuda":
            machine = f"GPU ({memory.get('accelerator') or 'CUDA'})"
        else:
            cores = f"{load['cpus']} cores" if load.get("cpus") else "core count not recorded"
            machine = f"CPU only ({cores}, no accelerator)"
        per_backbone = counts.setdefault(record["cell"]["backbone"], {})
        per_backbone[machine] = per_backbone.get(machine, 0) + 1
    return "; ".join(f"{backbone}: " + ", ".join(f"{n} cells on {machine}" for machine, n in sorted(machines.items()))
                     for backbone, machines in sorted(counts.items())) or "-"


def _variant_order(variants: Iterable[str]) -> list[str]:
    order = list(ABLATION_VARIANTS) + [m for m in CALIBRATION_METHODS + PEFT_BASELINES if m not in ABLATION_VARIANTS]
    return sorted(set(variants), key=lambda v: (order.index(v) if v in order else len(order), v))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _score_section(view: StudyView, output_dir: Path, figures_dir: Path):
    """main / ablation: per backbone and shots, rows = methods, columns = data sets (task metric, then ECE)."""
    parts, summary = [], []
    cells = view.cells
    for backbone in _unique(cell.backbone for cell in cells):
        for shots in sorted({cell.shots for cell in cells if cell.backbone == backbone}):
            chosen = [cell for cell in cells if cell.backbone == backbone and cell.shots == shots]
            datasets = _unique(cell.data for cell in chosen)
            variants = _variant_order(cell.variant for cell in chosen)
            rows = []
            for variant in variants:
                row = [variant_label(variant)]
                for data in datasets:
                    group = [(c, view.records[c.key]) for c in chosen
                             if c.variant == variant and c.data == data and c.key in view.records]
                    expected = len({c.seed for c in chosen if c.variant == variant and c.data == data})
                    task_type = _task_type_of(group)
                    metric, _ = task_metric(task_type)
                    score = _stats([r["test"].get(metric) for _, r in group])
                    ece = _stats([r["test"].get("ece") for _, r in group])
                    row.append(f"{_cell_text(score, expected=expected)} / {_cell_text(ece)}")
                    summary.append({"backbone": backbone, "shots": shots, "data": data, "variant": variant,
                                    "task_metric": metric, "score": score, "ece": ece,
                                    "lr": _unique(c.learning_rate for c in chosen if c.data == data)})
                rows.append(row)
            header = ["Method"] + [f"{_short_data(d)} ({task_metric(_task_type_of(view.groups('data').get((d,), [])))[1]} / ECE)"
                                   for d in datasets]
            rates = "; ".join(f"{_short_data(d)} " + ", ".join(_number_name(lr) for lr in sorted(
                {c.learning_rate for c in chosen if c.data == d})) for d in datasets)
            parts.append(f"**{backbone}, {shots} shots** (test score / ECE; learning rate: {rates})\n\n"
                         + _table(header, rows))
    return "\n\n".join(parts) if parts else "No cells planned.", summary, []


ABLATION_TEST_METRICS = ("ece", "nll", "auroc_error", "entity_ece")


def paper_grid_coverage(view: StudyView) -> dict:
    """Per backbone, how many cells of the paper's grid for `main` / `ablation` have finished: its data sets (where
    the study has any of them), 200 / 500 / 1000 shots and three seeds, together with those the study's cells use,
    times the study's default methods, at the learning rate each data set's cells use and the settings most of the
    study's cells share. What an invocation's own plan, which may ask for less, cannot say."""
    cells = view.cells
    if view.study not in ("main", "ablation") or not cells:
        return {}
    settings = Counter(cell.settings for cell in cells).most_common(1)[0][0]
    rates = defaultdict(Counter)  # the learning rate most of a data set's cells use (invocations may differ)
    for cell in cells:
        if cell.settings == settings:
            rates[cell.backbone, cell.data][cell.learning_rate] += 1
    learning_rates = {pair: counts.most_common(1)[0][0] for pair, counts in rates.items()}
    datasets = _unique(cell.data for cell in cells)
    if set(datasets) & set(PAPER_DATASETS):
        datasets = list(PAPER_DATASETS) + [data for data in datasets if data not in PAPER_DATASETS]
    shot_counts = sorted(set(PAPER_SHOTS) | {cell.shots for cell in cells})
    seeds = sorted(set(PAPER_SEEDS) | {cell.seed for cell in cells})
    methods = default_methods(view.study)
    coverage = {}
    for backbone in _unique(cell.backbone for cell in cells):
        table = {}
        for data in datasets:
            lr = learning_rates.get((backbone, data))
            table[data] = {
                shots: sum(lr is not None and Cell("train", backbone, data, shots, seed, method, lr, 0.0,
                                                   settings).key in view.records
                           for seed in seeds for method in methods)
                for shots in shot_counts
            }
        coverage[backbone] = {
            "planned": len(datasets) * len(shot_counts) * len(seeds) * len(methods),
            "finished": sum(sum(row.values()) for row in table.values()),
            "seeds": seeds,
            "methods": list(methods),
            "finished_per_data_and_shots": table,
        }
    return coverage


def _coverage_text(view: StudyView) -> str:
    coverage = paper_grid_coverage(view)
    parts = []
    for backbone, entry in coverage.items():
        table = entry["finished_per_data_and_shots"]
        shot_counts = list(next(iter(table.values())))
        per_cell = len(entry["seeds"]) * len(entry["methods"])
        rows = [[_short_data(data)] + [f"{row[shots]}/{per_cell}" for shots in shot_counts]
                for data, row in table.items()]
        parts.append(
            f"**Coverage of the paper's grid, {backbone}**: {entry['finished']} of {entry['planned']} cells finished "
            f"({len(table)} data sets x {len(shot_counts)} shot counts x seeds "
            f"{', '.join(map(str, entry['seeds']))} x {', '.join(variant_label(m) for m in entry['methods'])}; at the "
            "chosen learning rates and the settings of this study's cells)\n\n"
            + _table(["Data", *(f"{shots} shots" for shots in shot_counts)], rows))
    return "\n\n".join(parts)


def _main_section(view: StudyView, output_dir: Path, figures_dir: Path):
    from .peft_baselines import SPLIT_AND_FEDERATED_LORA

    markdown, summary, figures = _score_section(view, output_dir, figures_dir)
    return "\n\n".join([markdown, _coverage_text(view), SPLIT_AND_FEDERATED_LORA]), summary, figures


def _ablation_section(view: StudyView, output_dir: Path, figures_dir: Path):
    """The score table, then per data set every variant's test calibration (NLL, error AUROC, entity-token ECE for
    token tasks) and, for the lowest seed, its training per epoch: UM's mean temperature and confidence in training,
    dev score, ECE and NLL (what tells a gain of the memory from one of the temperature)."""
    from .methods import own_confidence_score

    markdown, summary, figures = _score_section(view, output_dir, figures_dir)
    parts = [markdown, _coverage_text(view)]
    for (backbone, shots, data), group in sorted(view.groups("backbone", "shots", "data").items(),
                                                 key=lambda item: (item[0][0], -item[0][1], item[0][2])):
        task_type = _task_type_of(group)
        metric, label = task_metric(task_type)
        names = [name for name in ABLATION_TEST_METRICS if any(name in record["test"] for _, record in group)]
        rows, epochs = [], []
        first_seed = min(cell.seed for cell, _ in group)
        for variant in _variant_order(cell.variant for cell, _ in group):
            mine = [record for cell, record in group if cell.variant == variant]
            rows.append([variant_label(variant)] + [_cell_text(_stats([own_confidence_score(r["test"], name)
                                                                      for r in mine])) for name in (metric, *names)])
            first = next(record for cell, record in group if cell.variant == variant and cell.seed == first_seed)
            training = {round(e["epoch"]): e for e in first["log_history"] if "loss" in e and "epoch" in e}
            for entry in (e for e in first["log_history"] if "eval_ece" in e):
                logs = training.get(round(entry["epoch"]), {})
                epochs.append([variant_label(variant), f"{entry['epoch']:.0f}"]
                              + [_number_text(logs.get(name)) for name in ("mean_temperature", "mean_confidence")]
                              + [_number_text(entry.get(f"eval_{name}")) for name in (metric, "ece", "nll")])
        header = ["Method", f"{label} ↑"] + [_METRIC_LABELS[name] for name in names]
        parts.append(f"**{backbone}, {_short_data(data)}, {shots} shots**: test (mean ± std over seeds; error "
                     "AUROC of the method's own confidence where it reports one)\n\n"
                     + _table(header, rows))
        parts.append(f"Training per epoch, seed {first_seed} (mean T and confidence: UM's, over the epoch's "
                     f"training batches; dev: the softmax before any dev fit)\n\n"
                     + _table(["Method", "Epoch", "mean T (train)", "mean confidence (train)", f"dev {label}",
                               "dev ECE", "dev NLL"], epochs))
    return "\n\n".join(parts), summary, figures


_METRIC_LABELS = {"ece": "ECE ↓", "nll": "NLL ↓", "auroc_error": "Error AUROC ↑", "entity_ece": "Entity-token ECE ↓"}


def _number_text(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _tune_section(view: StudyView, output_dir: Path, figures_dir: Path):
    finished = [record for _, record in view.finished()]
    selection = select_learning_rates(finished, waiting_tuning_groups(output_dir))
    rows, summary = [], []
    for (backbone, data, shots, settings), picked in sorted(selection.items()):
        candidates = ", ".join(f"{_number_name(lr)}: {score:.3f}" for lr, score in picked["candidates"].items())
        if picked["waiting"]:
            rows.append([backbone, _short_data(data), str(shots),
                         "not yet (a tuning cell has not finished; until then other studies run here only at a fixed "
                         "`--lr`)", candidates, "–"])
            summary.append({"backbone": backbone, "data": data, "shots": shots, "settings": json.loads(settings),
                            **picked, "learning_rate": None})
            continue
        chosen = next(r for r in finished if tuning_group(r["cell"]) == (backbone, data, shots, settings)
                      and r["cell"]["learning_rate"] == picked["learning_rate"])
        metric, label = task_metric(chosen["task_type"])
        test = chosen["test"].get(metric)
        rows.append([backbone, _short_data(data), str(shots), _number_name(picked["learning_rate"]), candidates,
                     f"{label} {test:.3f}" if test is not None else "–"])
        summary.append({"backbone": backbone, "data": data, "shots": shots, "settings": json.loads(settings),
                        **picked, "test": chosen["test"], "task_metric": metric})
    text = ("Does plain LoRA learn each task? LoRA alone, seed 0, the largest shot count of the invocation; dev "
            "macro-F1 (sequence tasks) or span F1 (token tasks) of the best epoch, per learning rate, and the test "
            "score at the chosen one. The chosen rate is used by every method of every study but `lr` at that shot "
            "count; one is chosen only once every tuning rate has finished.\n\n")
    header = ["Backbone", "Data", "Shots", "Chosen lr", "Dev score per lr", "Test at chosen lr"]
    return text + _table(header, rows), summary, []


def _curve_section(view: StudyView, output_dir: Path, figures_dir: Path, axis: str):
    """lr / missing: per backbone, data set and shots, rows = methods, columns = the axis values; one figure per
    backbone and shot count with one panel per data set."""
    from matplotlib.figure import Figure

    parts, summary, figures = [], [], []
    cells = view.cells
    label = {"learning_rate": "learning rate", "missing_rate": "missing rate"}[axis]
    for backbone in _unique(cell.backbone for cell in cells):
        for shots in sorted({cell.shots for cell in cells if cell.backbone == backbone}):
            chosen = [cell for cell in cells if cell.backbone == backbone and cell.shots == shots]
            datasets = _unique(cell.data for cell in chosen)
            figure = Figure(figsize=(4.2 * len(datasets), 3.4), layout="constrained")
            axes = figure.subplots(1, len(datasets), squeeze=False)[0]
            for panel, data in zip(axes, datasets):
                in_data = [cell for cell in chosen if cell.data == data]
                values = sorted({getattr(cell, axis) for cell in in_data})
                variants = _variant_order(cell.variant for cell in in_data)
                rows, task_label = [], "score"
                for variant in variants:
                    row, means, stds, xs = [variant_label(variant)], [], [], []
                    for value in values:
                        group = [view.records[c.key] for c in in_data
                                 if c.variant == variant and getattr(c, axis) == value and c.key in view.records]
                        expected = len({c.seed for c in in_data if c.variant == variant and getattr(c, axis) == value})
                        if group:
                            metric, task_label = task_metric(group[0]["task_type"])
                        else:
                            metric = "accuracy"
                        stats = _stats([r["test"].get(metric) for r in group])
                        row.append(_cell_text(stats, expected=expected))
                        summary.append({"backbone": backbone, "shots": shots, "data": data, "variant": variant,
                                        axis: value, "task_metric": metric, "score": stats})
                        if stats:
                            xs.append(value)
                            means.append(stats["mean"])
                            stds.append(stats["std"] or 0.0)
                    rows.append(row)
                    if xs:
                        panel.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=variant_label(variant))
                if axis == "learning_rate":
                    panel.set_xscale("log")
                if len(values) > 1:  # the planned range, so that a panel with few finished cells still reads right
                    low, high = (math.log(min(values)), math.log(max(values))) if axis == "learning_rate" \
                        else (min(values), max(values))
                    margin = 0.05 * (high - low)
                    limits = (low - margin, high + margin)
                    panel.set_xlim(*(map(math.exp, limits) if axis == "learning_rate" else limits))
                panel.set_title(f"{_short_data(data)}")
                panel.set_xlabel(label)
                panel.set_ylabel(f"test {task_label}")
                panel.grid(alpha=0.3)
                if panel.get_legend_handles_labels()[0]:
                    panel.legend(fontsize=8)
                header = ["Method"] + [_number_name(value) for value in values]
                parts.append(f"**{backbone}, {_short_data(data)}, {shots} shots** (test {task_label} by {label})\n\n"
                             + _table(header, rows))
            figure.suptitle(f"{backbone}, {shots} shots: test score by {label}")
            path = figures_dir / f"{view.study}_{_safe(backbone)}_{shots}shots.png"
            figure.savefig(path, dpi=110)
            figures.append(path)
    return "\n\n".join(parts) if parts else "No cells planned.", summary, figures


def _calibration_section(view: StudyView, output_dir: Path, figures_dir: Path):
    from ..evaluation.reliability import (
        save_reliability_comparison,
        save_reliability_diagram,
    )
    from .methods import own_confidence_score

    parts, summary, figures = [], [], []
    cells = view.cells
    for backbone in _unique(cell.backbone for cell in cells):
        for data in _unique(cell.data for cell in cells if cell.backbone == backbone):
            chosen = [cell for cell in cells if cell.backbone == backbone and cell.data == data]
            rows, pooled = [], {}
            task_label = "score"
            for variant in _variant_order(cell.variant for cell in chosen):
                mine = [cell for cell in chosen if cell.variant == variant]
                group = [view.records[c.key] for c in mine if c.key in view.records]
                metric, task_label = task_metric(group[0]["task_type"]) if group else ("accuracy", task_label)
                stats = {name: _stats([own_confidence_score(r["test"], name) for r in group])
                         for name in (metric, "ece", "nll", "brier", "auroc_error")}
                rows.append([variant_label(variant)] + [_cell_text(stats[metric], expected=len(mine))]
                            + [_cell_text(stats[name]) for name in ("ece", "nll", "brier", "auroc_error")])
                summary.append({"backbone": backbone, "data": data, "shots": mine[0].shots, "variant": variant,
                                "task_metric": metric, **{name: value for name, value in stats.items()}})
                arrays = [np.load(cell_dir(output_dir, c) / PREDICTIONS_NAME) for c in mine
                          if (cell_dir(output_dir, c) / PREDICTIONS_NAME).is_file() and c.key in view.records]
                if arrays:
                    pooled[variant_label(variant)] = (np.concatenate([a["confidence"] for a in arrays]),
                                                      np.concatenate([a["correct"] for a in arrays]))
                    path = figures_dir / f"reliability_{_safe(backbone)}_{_short_data(data)}_{_safe(variant)}.png"
                    save_reliability_diagram(*pooled[variant_label(variant)], path,
                                             title=f"{variant_label(variant)}, {backbone}, {_short_data(data)} "
                                             f"({len(arrays)} seeds pooled)")
                    figures.append(path)
            if pooled:
                path = figures_dir / f"reliability_{_safe(backbone)}_{_short_data(data)}_overlay.png"
                save_reliability_comparison(pooled, path, title=f"{backbone}, {_short_data(data)} (seeds pooled)")
                figures.append(path)
            header = ["Method", f"{task_label} ↑", "ECE ↓", "NLL ↓", "Brier ↓", "Error AUROC ↑"]
            verdict = _umema_verdict(view, chosen)
            parts.append(f"**{backbone}, {_short_data(data)}, {chosen[0].shots} shots** (error AUROC of the method's "
                         "own confidence where it reports one)\n\n" + _table(header, rows)
                         + (f"\n\n{verdict}" if verdict else ""))
    return "\n\n".join(parts) if parts else "No cells planned.", summary, figures


def _umema_tests(view: StudyView, chosen: Sequence[Cell]) -> tuple[dict, str | None]:
    """Method -> seed -> test metrics of one data set's finished cells, and their task type (None: none)."""
    tests = defaultdict(dict)
    for cell in chosen:
        if cell.key in view.records:
            tests[cell.variant][cell.seed] = view.records[cell.key]["test"]
    task_types = [view.records[cell.key]["task_type"] for cell in chosen if cell.key in view.records]
    return tests, (task_types[0] if task_types else None)


def _umema_verdict(view: StudyView, chosen: Sequence[Cell]) -> str:
    """`verdict.umema_verdict` over one data set's finished cells."""
    tests, task_type = _umema_tests(view, chosen)
    return umema_verdict(tests, task_type) if task_type else ""


def _at_a_glance(view: StudyView) -> str:
    """The calibration study in one table, first in `results.md`: per backbone and data set, UMEMA's score against
    LoRA's, its ECE against LoRA + TS's, and which of its bars (`verdict.umema_checks`) it clears and misses."""
    rows, cleared_everywhere = [], 0
    for backbone in _unique(cell.backbone for cell in view.cells):
        for data in _unique(cell.data for cell in view.cells if cell.backbone == backbone):
            chosen = [cell for cell in view.cells if cell.backbone == backbone and cell.data == data]
            tests, task_type = _umema_tests(view, chosen)
            seeds, checks = umema_checks(tests, task_type) if task_type else ([], [])
            if not checks:
                continue
            metric, label = task_metric(task_type)
            score, lora = (_stats([tests[name][seed].get(metric) for seed in seeds]) for name in ("umema", "lora"))
            score_text = "–"
            if score and lora and score["n"] == lora["n"] == len(seeds):
                difference = (score["mean"] - lora["mean"]) * 100
                score_text = f"{label} {score['mean']:.3f} / {lora['mean']:.3f} ({difference:+.1f} pt)"
            ece = next((item for item in checks if item.name == "ECE"), None)
            lowest = min(((stats["mean"], variant, stats["n"]) for variant in tests
                          if (stats := _stats([test.get("ece") for test in tests[variant].values()]))), default=None)
            lowest_text = "–"
            if lowest:
                lowest_text = f"{variant_label(lowest[1])} {lowest[0]:.3f} ({lowest[2]} seed{'s' * (lowest[2] != 1)})"
            missed = [item for item in checks if not item.passed]
            cleared_everywhere += not missed
            rows.append([backbone, _short_data(data), str(chosen[0].shots), ", ".join(map(str, seeds)),
                         score_text,
                         f"{ece.mine:.3f} / {ece.bar:.3f}" if ece else "–",
                         lowest_text,
                         f"{len(checks) - len(missed)} of {len(checks)}",
                         "; ".join(str(item) for item in missed) or "none"])
    if not rows:
        return ""
    header = ["Backbone", "Data", "Shots", "Seeds", "Score: UMEMA / LoRA", "ECE: UMEMA / LoRA + TS",
              "Lowest ECE, any method", "Bars cleared", "Bars missed"]
    return ("## At a glance: UMEMA against LoRA and LoRA + temperature scaling\n\n"
            f"UMEMA clears every bar on {cleared_everywhere} of the {len(rows)} rows (backbone and data set). "
            f"Its bars: ECE and NLL at most LoRA + TS's, the task score at least LoRA's less "
            f"{SCORE_TOLERANCE * 100:.1f} pt, "
            "errors ranked by its own confidence at least as well as by LoRA's softmax and by its own softmax "
            "(error AUROC; AURC against LoRA's), and entity-token ECE at most LoRA + TS's on token tasks; means over "
            "the seeds all three methods finished, from the calibration study below.\n\n"
            + _table(header, rows) + "\n\n")


def _overhead_section(view: StudyView, output_dir: Path, figures_dir: Path):
    from matplotlib.figure import Figure

    parts, summary, figures = [], [], []
    cells = view.cells
    for backbone in _unique(cell.backbone for cell in cells):
        datasets = _unique(cell.data for cell in cells if cell.backbone == backbone)
        figure = Figure(figsize=(4.4 * len(datasets), 3.8), layout="constrained")
        axes = figure.subplots(1, len(datasets), squeeze=False)[0]
        for panel, data in zip(axes, datasets):
            chosen = [cell for cell in cells if cell.backbone == backbone and cell.data == data]
            rows, reference = [], None
            for variant in _variant_order(cell.variant for cell in chosen):
                group = [view.records[c.key] for c in chosen if c.variant == variant and c.key in view.records]
                params = _stats([r["trainable_parameters"] for r in group])
                epoch = _stats([r["timings"].get("train_seconds_per_epoch") for r in group])
                memory = _stats([r["memory"]["peak_bytes"] / 2**20 for r in group])
                load = _stats([r.get("machine_load", {}).get("load_1min_at_end") for r in group])
                if variant == "lora":
                    reference = epoch
                ratio = (f"{epoch['mean'] / reference['mean']:.2f}x"
                         if epoch and reference and reference["mean"] else "–")
                rows.append([variant_label(variant), f"{params['mean']:,.0f}" if params else "–",
                             _cell_text(epoch, digits=1), ratio, _cell_text(memory, digits=0),
                             _cell_text(load, digits=1)])
                summary.append({"backbone": backbone, "data": data, "variant": variant, "trainable_parameters": params,
                                "train_seconds_per_epoch": epoch, "peak_memory_mib": memory,
                                "memory_measure": group[0]["memory"]["what"] if group else None,
                                "machine_load_1min_at_end": load})
                if params and epoch and memory:
                    panel.scatter([params["mean"]], [epoch["mean"]], s=max(memory["mean"] / 4, 20), alpha=0.5,
                                  label=f"{variant_label(variant)} ({memory['mean']:.0f} MiB)")
                    panel.annotate(variant_label(variant), (params["mean"], epoch["mean"]), fontsize=8)
            if panel.get_legend_handles_labels()[0]:
                panel.set_xscale("log")
                panel.margins(y=0.2)
                panel.set_ylim(bottom=0)  # from zero, so that the gaps between variants read at their true size
                panel.legend(fontsize=7, title="bubble: peak memory", title_fontsize=7)
            else:
                panel.text(0.5, 0.5, "no finished cells", transform=panel.transAxes, ha="center", va="center")
                panel.set_xticks([])
                panel.set_yticks([])
            panel.set_xlabel("trainable parameters")
            panel.set_ylabel("train time per epoch (s)")
            panel.set_title(_short_data(data))
            panel.grid(alpha=0.3)
            header = ["Variant", "Trainable params", "Train s / epoch", "x LoRA", "Peak memory (MiB)",
                      "Machine load at end"]
            parts.append(f"**{backbone}, {_short_data(data)}, {chosen[0].shots} shots**\n\n" + _table(header, rows))
        figure.suptitle(f"{backbone}: overhead (bubble area = peak memory)")
        path = figures_dir / f"overhead_{_safe(backbone)}.png"
        figure.savefig(path, dpi=110)
        figures.append(path)
    note = ("Time per epoch: the Trainer's training time less its dev evaluations, over one epoch; memory: "
            "`torch.cuda.max_memory_allocated` on a GPU, else the peak resident set of the cell's own process "
            "(the Python process, libraries and data included). Each overhead cell runs alone within its "
            "invocation; machine load is the 1-minute load average of the whole machine as the cell ended, which "
            "shows whether other processes shared it (compare it with the machine's CPU count; a cell's own "
            "training counts about its threads).\n\n")
    return note + ("\n\n".join(parts) if parts else "No cells planned."), summary, figures


def _unique(values: Iterable) -> list:
    seen = []
    for value in values:
        if value not in seen:
            seen.append(value)
    return seen


_SECTION_BUILDERS = {
    TUNE: _tune_section,
    "main": _main_section,
    "ablation": _ablation_section,
    "lr": lambda view, out, figs: _curve_section(view, out, figs, "learning_rate"),
    "missing": lambda view, out, figs: _curve_section(view, out, figs, "missing_rate"),
    "calibration": _calibration_section,
    "overhead": _overhead_section,
}


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

DEFAULT_OUTPUT_DIR = "umema-reproduce"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `peft-umema reproduce`."""
    defaults = TrainingSettings()
    parser.add_argument("--study", nargs="+", default=["all"], choices=[*STUDIES, "all"], metavar="STUDY",
                        help=f"studies to run: {', '.join(STUDIES)} or all")
    parser.add_argument("--backbone", nargs="+", default=["minilm"], metavar="NAME",
                        help="backbone(s): minilm, smollm2-135m, hub name or folder")
    parser.add_argument("--datasets", nargs="+", default=list(PAPER_DATASETS), metavar="DATA",
                        help="benchmark names or paths")
    parser.add_argument("--shots", nargs="+", type=int, default=list(PAPER_SHOTS), help="training examples per cell")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(PAPER_SEEDS), help="one cell per seed")
    parser.add_argument("--methods", nargs="+", metavar="METHOD",
                        help="methods / ablation variants (lora, +um, +ema, umema, lora+ts, mcdropout, ...) instead "
                        "of each study's own")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help="folder of the run folders (cells/, plans/)")
    parser.add_argument("--jobs", type=int, default=1, help="cells run side by side, each in its own process")
    parser.add_argument("--threads", type=int, help="torch threads per cell (default: cores / jobs)")
    parser.add_argument("--lr", type=float, help="learning rate of every study but lr (default: chosen on dev for "
                        "LoRA from --tune-lrs)")
    parser.add_argument("--tune-lrs", nargs="+", type=float, default=list(TUNE_LEARNING_RATES),
                        help="learning rates plain LoRA is tried at on dev (seed 0, the largest shot count)")
    parser.add_argument("--learning-rates", nargs="+", type=float, default=list(PAPER_LEARNING_RATES),
                        help="the lr study's grid")
    parser.add_argument("--missing-rates", nargs="+", type=float, default=list(MISSING_RATES),
                        help="the missing study's word-drop rates")
    parser.add_argument("--epochs", type=float, default=defaults.epochs, help="most epochs (early stopping on dev)")
    parser.add_argument("--patience", type=int, default=defaults.patience,
                        help="stop after this many epochs without a better dev score")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="examples per optimizer step")
    parser.add_argument("--max-length", type=int, default=defaults.max_length, help="tokens per example")
    parser.add_argument("--rank", type=int, default=defaults.rank, help="LoRA rank")
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps,
                        help="stop every cell after this many optimizer steps (smoke runs; -1: off)")
    parser.add_argument("--dev-size", type=int, help="pick epochs and fit calibration on a fixed seeded subset of "
                        "this many dev examples (smoke runs; default: the whole split)")
    parser.add_argument("--test-size", type=int, help="score on a fixed seeded subset of this many test examples "
                        "(smoke runs; default: the whole split, as the paper's tables need)")
    parser.add_argument("--overhead-epochs", type=float, default=1.0, help="epochs of an overhead cell")
    parser.add_argument("--keep-adapters", action="store_true", help="keep each cell's adapter weights")
    parser.add_argument("--dry-run", action="store_true", help="print the plan only")
    parser.add_argument("--report", action="store_true",
                        help="only rebuild the tables, figures and JSON from --output-dir")
    parser.add_argument("--report-dir", help="figures, results.md and protocol/ (default: OUTPUT_DIR/report)")
    parser.add_argument("--results-md", help="where results.md goes (default: REPORT_DIR/results.md)")
    parser.add_argument("--protocol-dir", help="one JSON per study (default: REPORT_DIR/protocol)")


def run_from_args(args: argparse.Namespace) -> int:
    import transformers

    transformers.logging.set_verbosity_error()  # load reports and bars of every cell would drown the progress lines
    transformers.logging.disable_progress_bar()
    report_options = dict(report_dir=args.report_dir, results_md=args.results_md, protocol_dir=args.protocol_dir)
    if args.report:
        report(args.output_dir, **report_options)
        return 0
    if args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}.")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}; leave it out for cores / jobs.")
    settings = TrainingSettings(epochs=args.epochs, patience=args.patience, batch_size=args.batch_size,
                                max_length=args.max_length, rank=args.rank, max_steps=args.max_steps,
                                dev_size=args.dev_size, test_size=args.test_size)
    grid = Grid(
        backbones=args.backbone, datasets=args.datasets, shots=args.shots, seeds=args.seeds, methods=args.methods,
        learning_rate=args.lr, tune_learning_rates=args.tune_lrs, learning_rates=args.learning_rates,
        missing_rates=args.missing_rates, overhead_epochs=args.overhead_epochs, settings=settings,
    )
    summary = reproduce(args.study, grid, args.output_dir, jobs=args.jobs, threads=args.threads,
                        keep_adapters=args.keep_adapters, dry_run=args.dry_run, command=command_line(args))
    if not args.dry_run:
        report(args.output_dir, **report_options)
    return 1 if summary["failed"] else 0


def command_line(args: argparse.Namespace) -> str:
    """The invocation spelled out with every option, so that the report shows what exactly ran."""
    parts = ["peft-umema", "reproduce", "--study", *args.study, "--backbone", *args.backbone,
             "--datasets", *args.datasets, "--shots", *map(str, args.shots), "--seeds", *map(str, args.seeds)]
    if args.methods:
        parts += ["--methods", *args.methods]
    if args.lr is not None:
        parts += ["--lr", _number_name(args.lr)]
    else:
        parts += ["--tune-lrs", *map(_number_name, args.tune_lrs)]
    if "lr" in args.study or "all" in args.study:
        parts += ["--learning-rates", *map(_number_name, args.learning_rates)]
    if "missing" in args.study or "all" in args.study:
        parts += ["--missing-rates", *map(_number_name, args.missing_rates)]
    parts += ["--epochs", _number_name(args.epochs), "--patience", str(args.patience), "--batch-size",
              str(args.batch_size), "--max-length", str(args.max_length), "--rank", str(args.rank)]
    if args.max_steps != -1:
        parts += ["--max-steps", str(args.max_steps)]
    for name in ("dev_size", "test_size"):
        if getattr(args, name) is not None:
            parts += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if "overhead" in args.study or "all" in args.study:
        parts += ["--overhead-epochs", _number_name(args.overhead_epochs)]
    parts += ["--output-dir", args.output_dir, "--jobs", str(args.jobs)]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    return " ".join(shlex.quote(part) for part in parts)
