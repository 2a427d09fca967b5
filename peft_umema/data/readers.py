"""Readers for users' own data in the layouts data sets are released in.

Tables (CSV, TSV, JSON, JSON lines, Parquet) are read by `datasets`' own builders; CoNLL-style token files (any
number of whitespace-separated columns, the token first and the tag last, ``-DOCSTART-`` lines) by
:func:`read_conll`. A folder of split files (``train.csv``, ``dev.txt``, ``eng.testa``, ``train-00000-of-00002.parquet``
...) is mapped to the splits by :func:`find_split_files`. The readers return the user's columns as they are; turning
them into the canonical columns is :mod:`peft_umema.data.columns`' job.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from datasets import Dataset

from ..constants import OUTSIDE_TAG

TABLE_FORMATS = ("csv", "tsv", "json", "parquet")
CONLL = "conll"
# Compression suffixes `datasets`' builders undo by themselves.
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_FORMAT_OF_EXTENSION = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
}
# Extensions of token files; a split word as the extension (CoNLL-2003's eng.train, eng.testa) counts too.
CONLL_EXTENSIONS = (".txt", ".conll", ".conllx", ".iob", ".iob1", ".iob2", ".bio", ".bioes", ".ner", ".tags", "")
# Words in a file name that say which split it holds; CoNLL-2003 calls its dev and test files testa and testb.
SPLIT_WORDS = {
    "train": "train",
    "training": "train",
    "trn": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "development": "validation",
    "testa": "validation",
    "test": "test",
    "testb": "test",
    "tst": "test",
}
SPLIT_ORDER = ("train", "validation", "test")
DOCSTART = "-DOCSTART-"
# Entity tags: O, or a prefix and a type. IOB1/IOB2 use B and I; BIOES/BILOU add S/U (single) and E/L (last).
_TAG = re.compile(r"O|(?P<prefix>[BIESLU])-(?P<type>\S.*)")


def data_format(path: Path) -> str:
    """``csv``, ``tsv``, ``json``, ``parquet`` or ``conll``, from the file name (a ``.tsv`` file is looked into:
    token files are often saved as ``.tsv``)."""
    name = path.name.lower()
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    found = _FORMAT_OF_EXTENSION.get(Path(name).suffix)
    if found == "tsv" and _looks_like_conll(path):
        return CONLL
    return found or CONLL


def _looks_like_conll(path: Path) -> bool:
    """Whether the first data line ends with an entity tag and the file has no header naming columns."""
    try:
        with path.open(encoding="utf-8", errors="replace") as file:
            for line in file:
                columns = _split_columns(line)
                if not columns or columns[0] == DOCSTART:
                    continue
                return len(columns) >= 2 and _TAG.fullmatch(columns[-1]) is not None
    except OSError:
        return False
    return False


def is_data_file(path: Path) -> bool:
    """Whether a file in a split folder can hold a split: a table or token file, not a README or a script."""
    if not path.is_file() or path.name.startswith((".", "_")):
        return False
    name = path.name.lower()
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    extension = Path(name).suffix
    return extension in _FORMAT_OF_EXTENSION or extension in CONLL_EXTENSIONS or extension[1:] in SPLIT_WORDS


def split_of_file(path: Path) -> str | None:
    """The split a file name names, from its words: ``train.csv``, ``eng.testa``, ``en_dev.conll``, ``test-01.parquet``.

    Raises when a name holds words of two splits (``train_dev.csv``): guessing would train on dev or test data.
    """
    words = re.split(r"[^a-z0-9]+", path.name.lower())
    splits = {SPLIT_WORDS[word] for word in words if word in SPLIT_WORDS}
    if len(splits) > 1:
        raise ValueError(
            f"{path}: the file name names several splits ({', '.join(sorted(splits))}); rename it, or pass the path of "
            "one file and let the other splits be carved from it."
        )
    return splits.pop() if splits else None


def find_split_files(folder: Path) -> dict[str, list[Path]]:
    """Data files of a folder grouped by the split their names name (a ``data/`` subfolder is looked in too).

    Several files of one split (shards) are read together. Files whose names name no split are ignored.
    """
    for candidate in (folder, folder / "data"):
        if not candidate.is_dir():
            continue
        found: dict[str, list[Path]] = {}
        for path in sorted(candidate.iterdir()):
            if is_data_file(path):
                split = split_of_file(path)
                if split is not None:
                    found.setdefault(split, []).append(path)
        if found:
            return {split: found[split] for split in SPLIT_ORDER if split in found}
    return {}


def read_table(paths: Sequence[Path], data_format_name: str, **builder_options) -> Dataset:
    """Rows of one or more table files of one format, read by `datasets`' csv / json / parquet builder.

    ``builder_options`` go to the builder (e.g. ``delimiter``, ``column_names`` for a CSV without a header row).
    Errors name the files.
    """
    files = [str(path) for path in paths]
    names = ", ".join(files)
    try:
        if data_format_name in ("csv", "tsv"):
            if data_format_name == "tsv":
                builder_options.setdefault("delimiter", "\t")
            return Dataset.from_csv(files, **builder_options)
        if data_format_name == "json":
            return Dataset.from_json(files, **builder_options)
        if data_format_name == "parquet":
            return Dataset.from_parquet(files, **builder_options)
    except FileNotFoundError:
        raise
    except Exception as error:  # pandas, pyarrow and json errors of many kinds: all mean the file is unreadable
        reason = " ".join(str(error).split())
        cause = error.__cause__ or error.__context__
        if cause is not None and str(cause) and str(cause) not in reason:
            reason = f"{reason}: {' '.join(str(cause).split())}"
        raise ValueError(
            f"{names}: cannot be read as {data_format_name.upper()} ({type(error).__name__}: {reason})."
        ) from error
    raise ValueError(f"Unknown table format {data_format_name!r}; expected one of {TABLE_FORMATS}.")


# ----------------------------------------------------------------------------------------------------------------
# CoNLL-style token files
# ----------------------------------------------------------------------------------------------------------------


def read_lines(path: Path, encoding: str = "utf-8") -> list[str]:
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


def _split_columns(line: str) -> list[str]:
    """Tab-separated columns when the line has a tab (tokens may then hold spaces), else whitespace-separated."""
    if "\t" in line:
        columns = [column.strip() for column in line.split("\t")]
        while columns and not columns[-1]:
            columns.pop()
        return columns
    return line.split()


def read_conll(path: Path) -> list[tuple[list[str], list[str]]]:
    """Sentences of a CoNLL-style token file as (tokens, IOB2 tags).

    One token per line with any number of columns, the token in the first and its entity tag in the last (CoNLL-2003:
    ``token POS chunk NER``); sentences end at whitespace-only lines; ``-DOCSTART-`` lines are skipped. IOB1 tags (an
    entity may start with ``I-``) and BIOES/BILOU tags are converted to IOB2. Errors name the file and the line.
    """
    sentences = []
    tokens, tags, first_line = [], [], None
    lines = read_lines(path)
    for number, line in enumerate(lines, start=1):
        columns = _split_columns(line)
        if not columns or columns[0] == DOCSTART:
            if tokens:
                sentences.append((tokens, _to_iob2_checked(tags, path, first_line)))
                tokens, tags = [], []
            continue
        if len(columns) < 2 or not columns[0]:
            raise ValueError(
                f"{path}, line {number}: expected a token and its tag in whitespace-separated columns ('token tag', "
                f"'token<TAB>tag' or 'token POS chunk tag', the tag last), got {line!r}."
            )
        tag = columns[-1]
        if _TAG.fullmatch(tag) is None:
            raise ValueError(
                f"{path}, line {number}: the last column must be an entity tag ('O', 'B-<type>', 'I-<type>'), got "
                f"{tag!r} in {line!r}."
            )
        if not tokens:
            first_line = number
        tokens.append(columns[0])
        tags.append(tag)
    if tokens:
        sentences.append((tokens, _to_iob2_checked(tags, path, first_line)))
    if not sentences:
        raise ValueError(f"{path}: no sentences (only blank and {DOCSTART} lines).")
    return sentences


def _to_iob2_checked(tags: list[str], path: Path, line: int) -> list[str]:
    try:
        return to_iob2(tags)
    except ValueError as error:
        raise ValueError(f"{path}, sentence at line {line}: {error}") from None


def is_entity_tag(tag: str) -> bool:
    return isinstance(tag, str) and _TAG.fullmatch(tag) is not None


def to_iob2(tags: Iterable[str]) -> list[str]:
    """IOB2 tags of one sentence: every entity starts with ``B-``.

    ``I-X`` after ``O`` or after another type starts an entity (IOB1, where ``B-`` only separates two adjacent
    entities of one type); ``S-``/``U-`` become ``B-`` and ``E-``/``L-`` become ``I-`` (BIOES, BILOU). IOB2 tags come
    back unchanged.
    """
    converted = []
    previous_type = None
    for tag in tags:
        match = _TAG.fullmatch(tag) if isinstance(tag, str) else None
        if match is None:
            raise ValueError(f"{tag!r} is not an entity tag ('O', 'B-<type>', 'I-<type>').")
        if tag == OUTSIDE_TAG:
            converted.append(OUTSIDE_TAG)
            previous_type = None
            continue
        prefix, entity_type = match["prefix"], match["type"]
        prefix = {"S": "B", "U": "B", "E": "I", "L": "I"}.get(prefix, prefix)
        if prefix == "I" and previous_type != entity_type:
            prefix = "B"
        converted.append(f"{prefix}-{entity_type}")
        previous_type = entity_type
    return converted
