"""Checks of what a user passes to `train`, `evaluate`, `predict` and `compare`, made before any work starts, and
the loading of backbones and run folders with errors that name the file, option or value at fault and the fix.

Every error here is a one-line `ValueError` or `OSError` subclass (`FileNotFoundError`, `NotADirectoryError`), so
the command line prints it as one line and exits with status 2. Functions take the name to report: a field name
(`max_length`) from the Python API, an option (`--max-length`) from the command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from .backbones import resolve_backbone

SHORT_BACKBONES = ("minilm", "smollm2-135m")
# Config fields that bound the positions (tokens) a backbone can take, in the order transformers' models use them.
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")
# A hub model id: `name` or `namespace/name`.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
MAX_SEED = 2**32 - 1  # numpy's seeds
MAX_LEARNING_RATE = 1.0
REPORT_FIXES = "re-run `peft-umema train` to write the run folder again, or copy it again from where it was made"
BACKBONE_TOKENIZER_FIX = (
    "save the tokenizer next to the model with tokenizer.save_pretrained(<folder>) (tokenizer.json or the vocabulary "
    "files, and tokenizer_config.json)"
)
IMAGE_SUFFIXES = (".png", "")  # the diagrams are PNG whatever the name
TASK_TYPES = ("SEQ_CLS", "TOKEN_CLS")


def describe(option: str, value: Any) -> str:
    """`--max-length 100000` for an option, `max_length=100000` for an argument."""
    return f"{option} {value}" if option.startswith("-") else f"{option}={value!r}"


def one_line(text: str) -> str:
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------------------------


def check_int(value: Any, option: str, *, minimum: int = 1, maximum: Optional[int] = None, also: tuple = ()) -> int:
    """An integer in [minimum, maximum] (or one of `also`, e.g. -1 for "no limit")."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{describe(option, value)}: expected an integer.")
    if value in also:
        return value
    if value < minimum or (maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        extra = "".join(f" or {item}" for item in also)
        raise ValueError(f"{describe(option, value)}: must be an integer {allowed}{extra}.")
    return value


def check_positive(value: Any, option: str) -> float:
    """A finite number > 0 (epochs, for instance)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{describe(option, value)}: must be a finite number > 0.")
    return float(value)


def check_seed(value: Any, option: str = "seed") -> int:
    return check_int(value, option, minimum=0, maximum=MAX_SEED)


def check_fraction(value: Any, option: str, *, closed: bool = False) -> float:
    """A number in [0, 1) (or [0, 1] when `closed`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{describe(option, value)}: expected a number between 0 and 1.")
    if value < 0 or value > 1 or (value == 1 and not closed):
        upper = "1" if closed else "1 (exclusive)"
        raise ValueError(f"{describe(option, value)}: must be a fraction between 0 and {upper}.")
    return float(value)


def check_learning_rate(value: Any, option: str = "learning_rate") -> float:
    """Finite, > 0 and at most 1: AdamW steps larger than 1 only diverge (LoRA uses 1e-5 .. 1e-2)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{describe(option, value)}: the learning rate must be a finite number > 0, e.g. 1e-3.")
    if value > MAX_LEARNING_RATE:
        raise ValueError(
            f"{describe(option, value)}: learning rates above {MAX_LEARNING_RATE:g} make training diverge (weights "
            "become NaN); LoRA uses 1e-5 to 1e-2, e.g. 1e-3."
        )
    return float(value)


# ----------------------------------------------------------------------------------------------------------------
# Output paths
# ----------------------------------------------------------------------------------------------------------------


def check_output_dir(path: str | os.PathLike, option: str = "output_dir") -> Path:
    """A folder that is, or can be made, writable: not a file, under no file, in a writable place."""
    folder = Path(os.fspath(path)).expanduser()
    if not os.fspath(path):
        raise ValueError(f"{option} is empty; pass the folder to write.")
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{option} {folder} is a file, not a folder; pass a folder path (or remove the file).")
    _check_writable_place(folder, option, "folder")
    return folder


def check_output_file(path: str | os.PathLike, option: str, suffixes: Optional[tuple[str, ...]] = None) -> Path:
    """A file that can be written: its folder exists or can be made, it is not a folder, its suffix is known."""
    file = Path(os.fspath(path)).expanduser()
    if file.is_dir():
        raise IsADirectoryError(f"{option} {file} is a folder; pass a file name.")
    if suffixes is not None and file.suffix.lower() not in suffixes:
        raise ValueError(
            f"{option} {file}: cannot write a {file.suffix or 'suffix-less'} file; use one of "
            f"{', '.join(s for s in suffixes if s)}."
        )
    _check_writable_place(file.parent, option, "file")
    return file


def _check_writable_place(folder: Path, option: str, what: str) -> None:
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise NotADirectoryError(
            f"{option} {folder}: {existing} is a file, so no {what} can be made under it; choose another path."
        )
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{option} {folder}: {existing} is not writable; choose a folder you can write to.")


# ----------------------------------------------------------------------------------------------------------------
# Backbones
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Backbone:
    """A backbone found: what to pass to `from_pretrained`, and its config."""

    name: str
    path: str
    config: Any

    @property
    def positions(self) -> Optional[tuple[str, int]]:
        """(config field, value) of the most tokens the backbone takes, or None if its config does not say."""
        for field in POSITION_FIELDS:
            value = getattr(self.config, field, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return field, value
        return None

    @property
    def hidden_size(self) -> Optional[int]:
        value = getattr(self.config, "hidden_size", None)
        return value if isinstance(value, int) and value > 0 else None


def looks_like_path(name: str) -> bool:
    """A name no hub id has: absolute, relative with ./ ../ ~, backslashes, or more than one slash."""
    return (
        name.startswith((".", "/", "~")) or os.path.isabs(name) or "\\" in name or HUB_ID.fullmatch(name) is None
    )


def check_backbone(name: str | os.PathLike, option: str = "model", *, named_in: Optional[Path] = None) -> Backbone:
    """Find a backbone and read its config, or fail with what is wrong and how to fix it.

    `named_in` is the file that named it (a run folder's `umema_run.json`), for a backbone folder that moved.
    """
    text = os.fspath(name)
    if not text.strip():
        raise ValueError(f"{option} is empty; pass a backbone name ({', '.join(SHORT_BACKBONES)}) or a model folder.")
    resolved = resolve_backbone(text)  # a short name whose package is missing says how to install it
    folder = Path(resolved).expanduser()
    where = f"{option} {text}" if named_in is None else f"The backbone {text} named in {named_in}"
    if folder.is_dir():
        _check_model_folder(folder, where)
    elif folder.exists():
        raise NotADirectoryError(f"{where} is a file; pass the model folder holding config.json and the weights.")
    elif looks_like_path(text):
        if named_in is not None:
            raise FileNotFoundError(
                f"{where} no longer exists (moved or deleted?); put the folder back there, or set \"backbone\" in "
                f"{named_in} to its new path."
            )
        raise FileNotFoundError(
            f"{where}: no such folder; pass an existing model folder (holding config.json) or a backbone name "
            f"({', '.join(SHORT_BACKBONES)})."
        )
    config = _load_config(resolved, text, where, local=folder.is_dir())
    return Backbone(name=text, path=resolved, config=config)


def _check_model_folder(folder: Path, where: str) -> None:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{where}: {folder} has no config.json, so it is not a transformers model folder; pass a folder written "
            "by save_pretrained() (config.json, the weights and the tokenizer files)."
        )
    _check_json_file(config_file, "re-save the backbone with save_pretrained()")
    weights = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not weights and not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{where}: {folder} has no weights ({' or '.join(WEIGHT_FILES[::2])}); save the model into it with "
            "save_pretrained()."
        )
    for file in sorted(folder.glob("*.safetensors")):
        check_safetensors_file(file, "re-save the backbone with save_pretrained(), or copy the file again")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        # transformers would make a tokenizer with no vocabulary (every word unknown) and train on nothing
        raise FileNotFoundError(
            f"{where}: {folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
            f"{BACKBONE_TOKENIZER_FIX}."
        )


def _load_config(resolved: str, text: str, where: str, local: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError, KeyError) as error:
        if local:
            raise ValueError(
                f"{where}: {Path(resolved) / 'config.json'} is not a usable transformers config "
                f"({one_line(error)}); re-save the backbone with save_pretrained()."
            ) from error
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        reason = (
            "HF_HUB_OFFLINE is set and it is not in the local cache" if offline
            else f"the Hugging Face Hub does not know it or could not be reached: {_first_sentence(error)}"
        )
        raise FileNotFoundError(
            f"{where}: not a backbone name ({', '.join(SHORT_BACKBONES)}), not an existing folder, and not loadable "
            f"from the Hugging Face Hub ({reason}); check the spelling, or pass the path of a local model folder."
        ) from error


def _first_sentence(error: BaseException) -> str:
    text = one_line(error)
    return text.split(". ")[0][:200]


def check_max_length(max_length: int, backbone: Backbone, option: str = "max_length") -> int:
    """`max_length` tokens fit the backbone's positions."""
    positions = backbone.positions
    if positions is not None and max_length > positions[1]:
        field, limit = positions
        raise ValueError(
            f"{describe(option, max_length)} exceeds the {limit} positions of the backbone {backbone.name} (its "
            f"config's {field}); use {option} {limit} or less."
        )
    return max_length


def check_rank(rank: int, backbone: Backbone, option: str = "rank") -> int:
    """A LoRA rank above the hidden size adds parameters and no capacity."""
    hidden = backbone.hidden_size
    if hidden is not None and rank > hidden:
        raise ValueError(
            f"{describe(option, rank)} exceeds the hidden size {hidden} of the backbone {backbone.name}; a LoRA rank "
            f"above it adds nothing; use {option} {hidden} or less (usually 4 to 64)."
        )
    return rank


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def check_safetensors_file(file: Path, fix: str = REPORT_FIXES) -> None:
    """Read the header of a safetensors file (cheap): a truncated or overwritten file fails here, by name."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(file), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{file} is damaged, not a complete safetensors file ({one_line(error)}); {fix}."
        ) from None


def _check_json_file(file: Path, fix: str = REPORT_FIXES) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{file} is not a text file (not UTF-8), so not valid JSON; {fix}.") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{file} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); {fix}."
        ) from None


def check_run_info(info: Any, path: Path) -> None:
    """The fields of `umema_run.json` that evaluate and predict rely on, of the right kinds."""
    fix = "re-run `peft-umema train` to write it again"
    for key in ("method", "backbone"):
        if not isinstance(info[key], str) or not info[key]:
            raise ValueError(f"{path}: \"{key}\" must be a non-empty string, got {info[key]!r}; {fix}.")
    if info["task_type"] not in TASK_TYPES:
        raise ValueError(f"{path}: \"task_type\" must be one of {TASK_TYPES}, got {info['task_type']!r}; {fix}.")
    labels = info["label_names"]
    if not isinstance(labels, list) or not labels or not all(isinstance(name, str) for name in labels):
        raise ValueError(f"{path}: \"label_names\" must be a non-empty list of strings, got {labels!r}; {fix}.")
    if len(set(labels)) != len(labels):
        raise ValueError(f"{path}: \"label_names\" repeat a name: {labels}; {fix}.")
    length = info["max_length"]
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"{path}: \"max_length\" must be a positive integer, got {length!r}; {fix}.")


def check_run_files(folder: Path, info: dict) -> None:
    """Every JSON and safetensors file of a run folder readable, its tokenizer present, its backbone where it was."""
    for file in sorted(folder.glob("*.json")) + sorted(folder.glob("*/*.json")):
        if file.name != "umema_run.json":  # read and checked already
            _check_json_file(file)
    for file in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*/*.safetensors")):
        check_safetensors_file(file)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); {REPORT_FIXES}, or save the "
            f"backbone's tokenizer into it: AutoTokenizer.from_pretrained({info.get('backbone')!r})"
            f".save_pretrained({os.fspath(folder)!r})."
        )


def load_tokenizer(path: str | os.PathLike, *, where: str, fix: str):
    """`AutoTokenizer.from_pretrained(path)` with a pad token, or an error naming `where` and `fix`."""
    from transformers import AutoTokenizer

    from ..data.preprocessing import prepare_tokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(path))
    except Exception as error:  # tokenizers, sentencepiece and transformers each raise their own kinds
        raise ValueError(f"Could not load the tokenizer of {where} ({_first_sentence(error)}); {fix}.") from error
    if len(tokenizer) <= len(tokenizer.all_special_tokens) + 1:
        raise ValueError(f"The tokenizer of {where} has no vocabulary (its files are missing or empty); {fix}.")
    return prepare_tokenizer(tokenizer)


@contextlib.contextmanager
def loading_run(folder: Path, method: str) -> Iterator[None]:
    """Errors of loading a checked run folder, from deep inside torch or peft, as one line naming the folder."""
    try:
        yield
    except (ValueError, OSError):
        raise  # ours and peft_umema's tuner's: they name the file already
    except Exception as error:
        raise ValueError(
            f"Could not load the {method} run in {folder}: its files do not fit together ({type(error).__name__}: "
            f"{_first_sentence(error)}); was adapter_config.json edited, or the backbone changed? {REPORT_FIXES}."
        ) from error


# Messages of torch ops fed NaN or inf: a run whose loss diverged.
_DIVERGED = re.compile(r"\bnan\b|\binf\b|between 0 and 1|non-finite|not finite", re.IGNORECASE)


@contextlib.contextmanager
def training(learning_rate: float, option: str = "learning_rate") -> Iterator[None]:
    """A training that blew up on NaN or inf becomes one line naming the learning rate."""
    try:
        yield
    except RuntimeError as error:
        if _DIVERGED.search(str(error)) is None:
            raise
        raise ValueError(
            f"Training diverged (the loss became NaN or inf: {_first_sentence(error)}); lower {option} (now "
            f"{learning_rate:g}), e.g. to 1e-3 or 1e-4."
        ) from error
