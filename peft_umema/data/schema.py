"""What a loaded data set is, decided once when it is loaded: the task, the label names and the columns.

Every loader returns the same canonical columns whatever the user's files call them, so that the rest of the
package never guesses again: sequence tasks have ``text`` (and ``text_pair`` for sentence-pair tasks) and ``label``
(a ``ClassLabel``); token tasks have ``tokens`` (list of str) and ``ner_tags`` (a sequence of ``ClassLabel``, IOB2
tags). A :class:`DataSchema` travels with the splits (``load_data`` returns both) and records, besides the task and
the label names, which of the user's columns each canonical column came from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Optional

from datasets import ClassLabel, Dataset, DatasetDict

from ..constants import IGNORE_INDEX, OUTSIDE_TAG, SEQ_CLS, TOKEN_CLS

__all__ = [
    "IGNORE_INDEX",
    "SEQ_CLS",
    "TOKEN_CLS",
    "TEXT",
    "TEXT_PAIR",
    "LABEL",
    "TOKENS",
    "TAGS",
    "DataSchema",
    "schema_of",
    "bio_label_names",
    "first_split",
]

# Canonical column names of loaded (not yet tokenized) data.
TEXT = "text"
TEXT_PAIR = "text_pair"
LABEL = "label"
TOKENS = "tokens"
TAGS = "ner_tags"


@dataclasses.dataclass(frozen=True)
class DataSchema:
    """The task type, label names and columns of a loaded data set.

    ``text_columns`` is ``("text",)`` or, for sentence-pair tasks, ``("text", "text_pair")``, tokenized as a pair.
    ``source_columns`` maps each canonical column to the column of the user's data it was read from (empty for the
    benchmark readers, which parse their own formats).
    """

    task_type: str
    label_names: tuple[str, ...]
    text_columns: tuple[str, ...] = (TEXT,)
    source_columns: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.task_type not in (SEQ_CLS, TOKEN_CLS):
            raise ValueError(f"task_type must be {SEQ_CLS!r} or {TOKEN_CLS!r}, got {self.task_type!r}.")
        object.__setattr__(self, "label_names", tuple(self.label_names))
        object.__setattr__(self, "text_columns", tuple(self.text_columns) if self.task_type == SEQ_CLS else ())
        object.__setattr__(self, "source_columns", dict(self.source_columns))
        if self.task_type == SEQ_CLS and self.text_columns not in ((TEXT,), (TEXT, TEXT_PAIR)):
            raise ValueError(f"text_columns must be ({TEXT!r},) or ({TEXT!r}, {TEXT_PAIR!r}), got {self.text_columns}.")
        if not self.label_names:
            raise ValueError("A data set needs at least one label name.")
        if len(set(self.label_names)) != len(self.label_names):
            raise ValueError(f"Label names must be distinct, got {list(self.label_names)}.")

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def label_column(self) -> str:
        """The column of the class ids: ``label`` per example, or ``ner_tags`` per token."""
        return LABEL if self.task_type == SEQ_CLS else TAGS

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.text_columns, LABEL) if self.task_type == SEQ_CLS else (TOKENS, TAGS)

    def to_dict(self) -> dict:
        return {
            "task_type": self.task_type,
            "label_names": list(self.label_names),
            "text_columns": list(self.text_columns),
            "source_columns": dict(self.source_columns),
        }

    @classmethod
    def from_dict(cls, values: Mapping) -> "DataSchema":
        return cls(
            task_type=values["task_type"],
            label_names=tuple(values["label_names"]),
            text_columns=tuple(values.get("text_columns") or (TEXT,)),
            source_columns=dict(values.get("source_columns") or {}),
        )


def schema_of(dataset: Dataset | DatasetDict, schema: Optional[DataSchema] = None) -> DataSchema:
    """The schema of data in the canonical columns (as every loader returns it); ``schema`` if one is given.

    For data that does not have the canonical columns, load it through ``load_data`` (which also accepts a
    ``Dataset`` or ``DatasetDict``, with column options) rather than calling this.
    """
    if schema is not None:
        return schema
    split = first_split(dataset)
    columns = set(split.column_names)
    if {TOKENS, TAGS} <= columns:
        feature = split.features[TAGS].feature
        task_type, text_columns = TOKEN_CLS, ()
    elif {TEXT, LABEL} <= columns:
        feature = split.features[LABEL]
        task_type, text_columns = SEQ_CLS, (TEXT, TEXT_PAIR) if TEXT_PAIR in columns else (TEXT,)
    else:
        raise ValueError(
            f"Cannot tell the task type from the columns {sorted(columns)}: expected {TEXT!r} and {LABEL!r} "
            f"(sequence classification) or {TOKENS!r} and {TAGS!r} (token classification), as load_data returns "
            "them. Load your own data with peft_umema.data.load_data(data, text_column=..., label_column=...) "
            "(or tokens_column=..., tags_column=...), which also accepts a Dataset or DatasetDict."
        )
    if not isinstance(feature, ClassLabel):
        raise ValueError(f"The label column must be a ClassLabel feature to know the label names, got {feature}.")
    return DataSchema(task_type=task_type, label_names=tuple(feature.names), text_columns=text_columns)


def bio_label_names(tags: Iterable[str]) -> list[str]:
    """``O`` first, then ``B-<type>``, ``I-<type>`` per type in alphabetical order: ids stable across splits and runs.

    Both tags of a type are listed even when a split only shows one of them, so a model can predict either.
    """
    types = sorted({tag[2:] for tag in tags if tag != OUTSIDE_TAG})
    return [OUTSIDE_TAG] + [f"{prefix}-{entity_type}" for entity_type in types for prefix in ("B", "I")]


def first_split(dataset: Dataset | DatasetDict) -> Dataset:
    if isinstance(dataset, DatasetDict):
        if not dataset:
            raise ValueError("The DatasetDict has no splits.")
        return next(iter(dataset.values()))
    if not isinstance(dataset, Dataset):
        raise TypeError(f"Expected a datasets.Dataset or DatasetDict, got {type(dataset).__name__}.")
    return dataset
