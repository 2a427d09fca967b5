"""From the user's columns to the canonical ones, once, when the data is loaded.

:func:`conform` picks the text / label or tokens / tags columns (given, or found by their common names), turns string
(or integer) labels into a ``ClassLabel`` (sorted, or in the order given), converts entity tags to IOB2, reports or
skips empty documents and sentences, and returns the splits in the canonical columns with their
:class:`~peft_umema.data.schema.DataSchema`. Errors name the file, the columns found and the option to pass.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from datasets import List as ListFeature
from datasets import Sequence as SequenceFeature

from .readers import is_entity_tag, to_iob2
from .schema import LABEL, SEQ_CLS, TAGS, TEXT, TEXT_PAIR, TOKEN_CLS, TOKENS, DataSchema, bio_label_names

# Common names, most likely first; matched case-insensitively.
TEXT_NAMES = ("text", "sentence", "content", "document", "review", "utterance", "body", "comment", "tweet")
PAIR_NAMES = (
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question1", "question2"),
    ("question", "sentence"),
    ("text_a", "text_b"),
    ("text1", "text2"),
    ("text", "text_pair"),
    ("sentence_a", "sentence_b"),
)
LABEL_NAMES = ("label", "category", "intent", "class", "labels", "target", "sentiment", "topic", "relation")
TOKENS_NAMES = ("tokens", "words")
TAGS_NAMES = ("ner_tags", "tags", "labels", "ner", "ner_labels", "tag", "label")
SPLIT_ALIASES = {"dev": "validation", "valid": "validation", "val": "validation", "development": "validation"}
_LISTED = 10  # empty rows or unknown labels named in a message before "and N more"
_OPTION_FLAGS = {
    "text_column": "--text-column",
    "label_column": "--label-column",
    "tokens_column": "--tokens-column",
    "tags_column": "--tags-column",
    "label_names": "--label-names",
    "skip_empty": "--skip-empty",
}


def option_hint(name: str, value: str = "...") -> str:
    """How to pass an option, in Python and on the command line."""
    return f"{name}={value} ({_OPTION_FLAGS[name]} on the command line)"


@dataclasses.dataclass(frozen=True)
class ColumnOptions:
    """The user's say on columns and labels; ``None`` means find it."""

    text_column: Optional[tuple[str, ...]] = None
    label_column: Optional[str] = None
    tokens_column: Optional[str] = None
    tags_column: Optional[str] = None
    label_names: Optional[tuple[str, ...]] = None
    skip_empty: bool = False

    @classmethod
    def make(
        cls,
        text_column: str | Sequence[str] | None = None,
        label_column: Optional[str] = None,
        tokens_column: Optional[str] = None,
        tags_column: Optional[str] = None,
        label_names: str | Sequence[str] | None = None,
        skip_empty: bool = False,
    ) -> "ColumnOptions":
        if isinstance(text_column, str):
            text_column = (text_column,)
        if text_column is not None:
            text_column = tuple(text_column)
            if not 1 <= len(text_column) <= 2 or not all(isinstance(c, str) and c for c in text_column):
                raise ValueError(
                    f"text_column takes one column name, or two for sentence-pair tasks, got {list(text_column)}."
                )
        if isinstance(label_names, str):
            label_names = [name.strip() for name in label_names.split(",")]
        if label_names is not None:
            label_names = tuple(str(name) for name in label_names)
            if not label_names or not all(label_names):
                raise ValueError(f"label_names must be non-empty names, got {list(label_names)}.")
            if len(set(label_names)) != len(label_names):
                raise ValueError(f"label_names must be distinct, got {list(label_names)}.")
        if (text_column or label_column) and (tokens_column or tags_column):
            raise ValueError(
                "Pass text_column / label_column (sequence classification) or tokens_column / tags_column (token "
                "classification), not both."
            )
        return cls(text_column, label_column, tokens_column, tags_column, label_names, bool(skip_empty))

    @property
    def chooses_columns(self) -> bool:
        return any(
            value is not None for value in (self.text_column, self.label_column, self.tokens_column, self.tags_column)
        )

    @property
    def is_default(self) -> bool:
        return not self.chooses_columns and self.label_names is None and not self.skip_empty

    def to_dict(self) -> dict:
        """The options that were given (for the run folder, so that `evaluate` can read the data the same way)."""
        values = {
            "text_column": list(self.text_column) if self.text_column else None,
            "label_column": self.label_column,
            "tokens_column": self.tokens_column,
            "tags_column": self.tags_column,
            "label_names": list(self.label_names) if self.label_names else None,
            "skip_empty": self.skip_empty or None,
        }
        return {key: value for key, value in values.items() if value is not None}


def canonical_split_names(splits: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``dev`` / ``valid`` / ``val`` become ``validation``; two names for one split are an error."""
    renamed: dict[str, Any] = {}
    for name, value in splits.items():
        canonical = SPLIT_ALIASES.get(name.lower(), name.lower() if name.lower() in ("train", "test") else name)
        if canonical in renamed:
            raise ValueError(f"{what} has two {canonical} splits ({', '.join(splits)}); keep one.")
        renamed[canonical] = value
    return renamed


def conform(
    splits: Mapping[str, Dataset], sources: Mapping[str, str], options: ColumnOptions
) -> tuple[DatasetDict, DataSchema]:
    """The splits in the canonical columns, and their schema. ``sources`` names where each split came from."""
    if not splits:
        raise ValueError("No splits to load.")
    reference = "train" if "train" in splits else next(iter(splits))
    chosen = _choose_columns(splits[reference], sources[reference], options)
    splits = dict(splits)
    for split in list(splits):
        if split != reference and _unlabelled(splits[split], chosen.get(LABEL)):
            warnings.warn(
                f"{sources[split]}: every label is -1 (no gold labels, as in GLUE's test splits); the split is left "
                "out, and carved from train instead.",
                stacklevel=3,
            )
            del splits[split]
    for split, dataset in splits.items():
        missing = [column for column in chosen.values() if column not in dataset.column_names]
        if missing:
            raise ValueError(
                f"{sources[split]}: no column {missing[0]!r} (found {dataset.column_names}), which "
                f"{sources[reference]} has; give every split the same columns."
            )
        if len(dataset) == 0:
            raise ValueError(f"{sources[split]}: no rows (columns found: {dataset.column_names}).")
    if TOKENS in chosen:
        return _conform_tokens(splits, sources, chosen, options)
    return _conform_sequences(splits, sources, chosen, options)


# ----------------------------------------------------------------------------------------------------------------
# Choosing the columns
# ----------------------------------------------------------------------------------------------------------------


def _unlabelled(dataset: Dataset, label: Optional[str]) -> bool:
    if label is None or label not in dataset.column_names or not isinstance(dataset.features[label], ClassLabel):
        return False
    return all(value == -1 for value in dataset[label])


def _choose_columns(dataset: Dataset, source: str, options: ColumnOptions) -> dict[str, str]:
    """Canonical column -> the user's column, e.g. ``{"text": "review", "label": "stars"}``."""
    columns = dataset.column_names
    features = dataset.features
    for given in (*(options.text_column or ()), options.label_column, options.tokens_column, options.tags_column):
        if given is not None and given not in columns:
            raise ValueError(f"{source}: no column {given!r}; columns found: {columns}.")
    token_task = options.tokens_column is not None or options.tags_column is not None
    if not token_task and options.text_column is None and options.label_column is None:
        token_task = _find(columns, TOKENS_NAMES, lambda c: _is_list_of_strings(features[c])) is not None
    if token_task:
        tokens = options.tokens_column or _find(columns, TOKENS_NAMES, lambda c: _is_list_of_strings(features[c]))
        if tokens is None:
            raise ValueError(
                f"{source}: cannot tell which column holds the tokens (lists of words); columns found: {columns}. "
                f"Pass {option_hint('tokens_column')}."
            )
        tags = options.tags_column or _find(columns, TAGS_NAMES, lambda c: c != tokens and _is_list(features[c]))
        if tags is None:
            other_lists = [c for c in columns if c != tokens and _is_list(features[c])]
            tags = other_lists[0] if len(other_lists) == 1 else None
        if tags is None:
            raise ValueError(
                f"{source}: cannot tell which column holds the entity tags (one tag per token); columns found: "
                f"{columns}. Pass {option_hint('tags_column')}."
            )
        return {TOKENS: tokens, TAGS: tags}

    label = options.label_column or _find(columns, LABEL_NAMES, lambda c: not _is_list(features[c]))
    if label is None:
        class_labels = [c for c in columns if isinstance(features[c], ClassLabel)]
        label = class_labels[0] if len(class_labels) == 1 else None
    if label is None:
        raise ValueError(
            f"{source}: cannot tell which column holds the labels; columns found: {columns}. Pass "
            f"{option_hint('label_column')} (and {option_hint('text_column')} if the text column is not found either)."
        )
    texts = options.text_column or _find_text_columns(dataset, label)
    if texts is None:
        raise ValueError(
            f"{source}: cannot tell which column holds the text; columns found: {columns}. Pass "
            f"{option_hint('text_column')} (two names for a sentence pair)."
        )
    if label in texts:
        raise ValueError(f"{source}: {label!r} cannot be both the text and the label column.")
    chosen = {TEXT: texts[0], LABEL: label}
    if len(texts) == 2:
        chosen[TEXT_PAIR] = texts[1]
    return chosen


def _find_text_columns(dataset: Dataset, label: str) -> Optional[tuple[str, ...]]:
    columns = [c for c in dataset.column_names if c != label]
    lowered = {c.lower(): c for c in columns}
    for first, second in PAIR_NAMES:
        if first in lowered and second in lowered:
            return lowered[first], lowered[second]
    single = _find(columns, TEXT_NAMES, lambda c: True)
    if single is not None:
        return (single,)
    strings = [c for c in columns if _is_string(dataset.features[c])]
    return (strings[0],) if len(strings) == 1 else None


def _find(columns: Sequence[str], names: Sequence[str], accept) -> Optional[str]:
    lowered = {}
    for column in columns:
        lowered.setdefault(column.lower(), column)
    for name in names:
        column = lowered.get(name)
        if column is not None and accept(column):
            return column
    return None


def _is_string(feature) -> bool:
    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


def _is_list(feature) -> bool:
    return isinstance(feature, (ListFeature, SequenceFeature, list))


def _inner(feature):
    if isinstance(feature, list):
        return feature[0] if feature else None
    return feature.feature


def _is_list_of_strings(feature) -> bool:
    return _is_list(feature) and _is_string(_inner(feature))


# ----------------------------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------------------------


def _label_values(dataset: Dataset, column: str, source: str, per_token: bool) -> tuple[list, Optional[list[str]]]:
    """The column's values as names (str) or integer ids, and the ClassLabel names when it has them."""
    feature = dataset.features[column]
    if per_token:
        if not _is_list(feature):
            raise ValueError(
                f"{source}: the tags column {column!r} holds {feature}, not one tag per token; pass "
                f"{option_hint('tags_column')} naming a column of tag lists."
            )
        feature = _inner(feature)
    elif _is_list(feature):
        raise ValueError(
            f"{source}: the label column {column!r} holds lists ({feature}), not one class per example; for token "
            f"classification pass {option_hint('tokens_column')} and {option_hint('tags_column')}, else "
            f"{option_hint('label_column')} naming a column of single labels."
        )
    values = dataset[column]
    if isinstance(feature, ClassLabel):
        return values, list(feature.names)
    if isinstance(feature, Value) and feature.dtype.startswith(("float", "double")):
        flat = [value for value in (_flatten_tags(values) if per_token else values) if value is not None]
        if not all(math.isnan(value) or float(value).is_integer() for value in flat):
            raise ValueError(
                f"{source}: the label column {column!r} holds numbers ({feature.dtype}), not classes; pass "
                f"{option_hint('label_column')} naming a column of class names or integer ids."
            )
        # integer ids read as floats because a cell is empty (pandas' NaN): ids again, the empty cell an error
        convert = int
        values = _map_nested(values, lambda value: None if value is None or math.isnan(value) else value)
    elif isinstance(feature, Value) and feature.dtype == "bool":
        convert = str
    elif isinstance(feature, Value) and (feature.dtype.startswith(("int", "uint"))):
        convert = int
    elif _is_string(feature):
        convert = str
    else:
        raise ValueError(
            f"{source}: the {'tags' if per_token else 'label'} column {column!r} holds {feature}, not class names "
            f"or ids; pass {option_hint('tags_column' if per_token else 'label_column')} naming another column."
        )

    def converted(value, row):
        if value is None:
            raise ValueError(f"{source}, row {row + 1}: no {'tag' if per_token else 'label'} in column {column!r}.")
        return convert(value)

    if per_token:
        rows = [None if tags is None else [converted(tag, row) for tag in tags] for row, tags in enumerate(values)]
        return rows, None
    return [converted(value, row) for row, value in enumerate(values)], None


def _as_names(
    values_by_split: Mapping[str, list],
    class_names: Mapping[str, Optional[list[str]]],
    sources: Mapping[str, str],
    options: ColumnOptions,
    column: str,
    flatten,
) -> dict[str, list]:
    """Every split's values as names: ClassLabel ids become their names, integer ids the ``label_names`` given (or
    their digits), strings stay."""
    as_names: dict[str, list] = {}
    for split, values in values_by_split.items():
        names = class_names[split]
        sample = next(iter(flatten(values)), None)
        if names is not None:
            negative = next((v for v in flatten(values) if v is None or v < 0), None) if values else None
            if negative is not None:
                raise ValueError(
                    f"{sources[split]}: {column!r} holds the class id {negative}, which names no class (-1 marks an "
                    f"unlabelled row); drop the unlabelled rows, or pass {option_hint('label_column')} naming another "
                    "column."
                )
            as_names[split] = _map_nested(values, lambda value: names[value])
        elif isinstance(sample, int):
            if options.label_names is None:
                as_names[split] = _map_nested(values, str)
                continue
            given = options.label_names
            out_of_range = sorted({v for v in flatten(values) if not 0 <= v < len(given)})
            if out_of_range:
                raise ValueError(
                    f"{sources[split]}: {column!r} holds the ids {_listed(out_of_range)}, beyond the {len(given)} "
                    f"label_names given ({list(given)}), which name the ids 0 to {len(given) - 1}."
                )
            as_names[split] = _map_nested(values, lambda value: given[value])
        else:
            as_names[split] = values
    return as_names


def _shared_class_names(class_names: Mapping[str, Optional[list[str]]]) -> Optional[list[str]]:
    """The ClassLabel names when every split has the same ones, else None."""
    names = list(class_names.values())
    if names and names[0] is not None and all(other == names[0] for other in names):
        return names[0]
    return None


def _map_nested(values: list, function) -> list:
    if values and isinstance(values[0], list):
        return [None if row is None else [function(value) for value in row] for row in values]
    return [function(value) for value in values]


def _natural_key(name: str):
    """Integer-like names in numeric order (``2`` before ``10``), then the rest alphabetically."""
    return (0, int(name), "") if name.lstrip("-").isdigit() else (1, 0, name)


def _listed(items: Sequence) -> str:
    shown = ", ".join(repr(item) if isinstance(item, str) else str(item) for item in items[:_LISTED])
    return shown + (f" and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


# ----------------------------------------------------------------------------------------------------------------
# Sequence and token tasks
# ----------------------------------------------------------------------------------------------------------------


def _conform_sequences(splits, sources, chosen, options) -> tuple[DatasetDict, DataSchema]:
    text_columns = [chosen[TEXT]] + ([chosen[TEXT_PAIR]] if TEXT_PAIR in chosen else [])
    for split, dataset in splits.items():
        for column in text_columns:
            if not _is_string(dataset.features[column]):
                raise ValueError(
                    f"{sources[split]}: the text column {column!r} holds {dataset.features[column]}, not text; pass "
                    f"{option_hint('text_column')} naming a column of strings (columns found: {dataset.column_names})."
                )
    values, class_names = {}, {}
    for split, dataset in splits.items():
        values[split], class_names[split] = _label_values(dataset, chosen[LABEL], sources[split], per_token=False)
    as_names = _as_names(values, class_names, sources, options, chosen[LABEL], flatten=lambda v: v)
    found = {name for names in as_names.values() for name in names}
    shared = _shared_class_names(class_names)
    if options.label_names is not None:
        names = list(options.label_names)
        for split, split_names in as_names.items():
            unknown = sorted(set(split_names) - set(names), key=_natural_key)
            if unknown:
                raise ValueError(
                    f"{sources[split]}: {chosen[LABEL]!r} holds labels that are not among the label_names given: "
                    f"{_listed(unknown)}; label_names: {names}."
                )
    elif shared is not None and found <= set(shared):
        names = shared
    else:
        names = sorted(found, key=_natural_key)
    ids = {name: index for index, name in enumerate(names)}
    canonical = [TEXT, TEXT_PAIR][: len(text_columns)]
    features = Features({**{c: Value("string") for c in canonical}, LABEL: ClassLabel(names=names)})
    result = {}
    for split, dataset in splits.items():
        texts = [dataset[column] for column in text_columns]
        empty = [row for row in range(len(dataset)) if any(not (t[row] or "").strip() for t in texts)]
        keep = _keep_rows(len(dataset), empty, sources[split], "empty documents", options)
        columns = {c: [t[row] for row in keep] for c, t in zip(canonical, texts)}
        columns[LABEL] = [ids[as_names[split][row]] for row in keep]
        result[split] = Dataset.from_dict(columns, features=features)
    schema = DataSchema(SEQ_CLS, tuple(names), tuple(canonical), source_columns=chosen)
    return DatasetDict(result), schema


def _conform_tokens(splits, sources, chosen, options) -> tuple[DatasetDict, DataSchema]:
    tokens_by_split, values, class_names = {}, {}, {}
    for split, dataset in splits.items():
        if not _is_list_of_strings(dataset.features[chosen[TOKENS]]):
            raise ValueError(
                f"{sources[split]}: the tokens column {chosen[TOKENS]!r} holds {dataset.features[chosen[TOKENS]]}, "
                f"not lists of words; pass {option_hint('tokens_column')} (columns found: {dataset.column_names})."
            )
        tokens_by_split[split] = dataset[chosen[TOKENS]]
        values[split], class_names[split] = _label_values(dataset, chosen[TAGS], sources[split], per_token=True)
        sample = next(iter(_flatten_tags(values[split])), None)
        if class_names[split] is None and isinstance(sample, int) and options.label_names is None:
            raise ValueError(
                f"{sources[split]}: the tags column {chosen[TAGS]!r} holds integer ids without names; pass "
                f"{option_hint('label_names', 'O,B-PER,I-PER,...')} naming the ids in order."
            )
    as_names = _as_names(values, class_names, sources, options, chosen[TAGS], flatten=_flatten_tags)
    converted_by_split = {}
    for split in splits:
        converted = []
        for row, (tokens, tags) in enumerate(zip(tokens_by_split[split], as_names[split])):
            tokens, tags = tokens or [], tags or []
            if len(tokens) != len(tags):
                raise ValueError(
                    f"{sources[split]}, row {row + 1}: {len(tokens)} tokens in {chosen[TOKENS]!r} but {len(tags)} "
                    f"tags in {chosen[TAGS]!r}; a token task needs one tag per token."
                )
            if any(token is None for token in tokens):
                raise ValueError(f"{sources[split]}, row {row + 1}: a token in {chosen[TOKENS]!r} is missing (null).")
            try:
                converted.append(to_iob2(tags))
            except ValueError as error:
                raise ValueError(
                    f"{sources[split]}, row {row + 1}: {error} Token classification needs entity tags in "
                    f"{chosen[TAGS]!r}; pass {option_hint('tags_column')} naming the column of entity tags."
                ) from None
        converted_by_split[split] = converted
    used = {tag for converted in converted_by_split.values() for tags in converted for tag in tags}
    shared = _shared_class_names(class_names)
    if options.label_names is not None:
        names = list(options.label_names)
        not_tags = [name for name in names if not is_entity_tag(name)]
        if not_tags:
            raise ValueError(
                f"label_names of a token task must be entity tags (O, B-<type>, I-<type>), got {not_tags}."
            )
        missing = sorted(used - set(names))
        if missing:
            raise ValueError(
                f"The IOB2 tags {missing} occur in the data but not among the label_names given ({names}); add them."
            )
    elif shared is not None and used <= set(shared) and all(is_entity_tag(name) for name in shared):
        names = shared  # a hub data set's own tag order
    else:
        names = bio_label_names(used)
    ids = {name: index for index, name in enumerate(names)}
    features = Features({TOKENS: SequenceFeature(Value("string")), TAGS: SequenceFeature(ClassLabel(names=names))})
    result = {}
    for split in splits:
        tokens = tokens_by_split[split]
        empty = [row for row, words in enumerate(tokens) if not words]
        keep = _keep_rows(len(tokens), empty, sources[split], "empty sentences (no tokens)", options)
        result[split] = Dataset.from_dict(
            {
                TOKENS: [list(tokens[row]) for row in keep],
                TAGS: [[ids[tag] for tag in converted_by_split[split][row]] for row in keep],
            },
            features=features,
        )
    schema = DataSchema(TOKEN_CLS, tuple(names), (), source_columns=chosen)
    return DatasetDict(result), schema


def _flatten_tags(values: Iterable) -> Iterable:
    for tags in values:
        if tags:
            yield from tags


def _keep_rows(total: int, empty: list[int], source: str, what: str, options: ColumnOptions) -> list[int]:
    """Rows to keep: all, or all but the empty ones when skipping; else empty rows are an error naming them."""
    if not empty:
        return list(range(total))
    rows = _listed([row + 1 for row in empty])
    if not options.skip_empty:
        raise ValueError(
            f"{source}: {len(empty)} {what} (row {rows}); there is nothing to classify in them. Fix the data, or pass "
            f"{option_hint('skip_empty', 'True')} to drop them."
        )
    warnings.warn(f"{source}: skipped {len(empty)} {what} (row {rows}).", stacklevel=3)
    empty_rows = set(empty)
    return [row for row in range(total) if row not in empty_rows]


def check_empty(
    splits: DatasetDict, schema: DataSchema, sources: Mapping[str, str], options: ColumnOptions
) -> DatasetDict:
    """Report (or drop, with ``skip_empty``) empty documents or sentences of data already in the canonical columns."""
    result = {}
    for split, dataset in splits.items():
        if schema.task_type == SEQ_CLS:
            texts = [dataset[column] for column in schema.text_columns]
            empty = [row for row in range(len(dataset)) if any(not (t[row] or "").strip() for t in texts)]
            what = "empty documents"
        else:
            empty = [row for row, words in enumerate(dataset[TOKENS]) if not words]
            what = "empty sentences (no tokens)"
        keep = _keep_rows(len(dataset), empty, sources.get(split, f"split {split!r}"), what, options)
        result[split] = dataset if len(keep) == len(dataset) else dataset.select(keep)
    return DatasetDict(result)
