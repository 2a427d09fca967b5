"""Tokenization with label alignment, seeded k-shot subsets and missing-information corruption."""

from __future__ import annotations

import json
import re
from typing import Optional

import numpy as np
from datasets import Dataset, DatasetDict

from .loaders import stratification_keys, stratified_sample
from .schema import (
    IGNORE_INDEX,
    LABEL,
    SEQ_CLS,
    TAGS,
    TEXT,
    TEXT_PAIR,
    TOKEN_CLS,
    TOKENS,
    DataSchema,
    first_split,
    schema_of,
)

__all__ = [
    "IGNORE_INDEX",
    "CORRUPTION_MODES",
    "prepare_tokenizer",
    "tokenize_dataset",
    "tokenize_sequence_classification",
    "tokenize_token_classification",
    "k_shot_subset",
    "evaluation_subset",
    "corrupt_missing",
]
# A newline between the two texts of a pair, for tokenizers whose pair encoding puts nothing between them (GPT-2,
# SmolLM2): glued together, the last word of one text and the first of the other would merge.
PAIR_SEPARATOR = "\n"
CORRUPTION_MODES = ("drop", "mask")
# Dev and test subsets do not depend on the run's seed: every seed and method is scored on the same examples.
EVALUATION_SUBSET_SEED = 0
# What corruption never removes from a text: whitespace, and SemEval's entity markers, without which an example no
# longer says which entity pair it is about.
_TEXT_SEPARATORS = re.compile(r"(\s+|</?e[12]>)")


def prepare_tokenizer(tokenizer):
    """Give ``tokenizer`` a pad token (its EOS when it has none, as for GPT-2 and Llama) and right padding.

    Batching needs a pad token, and GPT-2/Llama sequence classifiers find the last real token of each row through
    ``pad_token_id``; right padding keeps that last token, and the word-aligned labels, where the hooks expect them.
    Changes ``tokenizer`` in place and returns it.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                "The tokenizer has neither a pad nor an EOS token. Add one with "
                "tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the model's token embeddings."
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def tokenize_dataset(
    dataset: Dataset | DatasetDict, tokenizer, max_length: int = 512, schema: Optional[DataSchema] = None
) -> Dataset | DatasetDict:
    """Tokenize a loaded data set for its task (``schema``: as ``load_data`` returned it; read off the columns if
    not given)."""
    task_type, _ = _task_and_texts(dataset, schema)
    if task_type == SEQ_CLS:
        return tokenize_sequence_classification(dataset, tokenizer, max_length, schema=schema)
    return tokenize_token_classification(dataset, tokenizer, max_length)


def _task_and_texts(dataset: Dataset | DatasetDict, schema: Optional[DataSchema]) -> tuple[str, tuple[str, ...]]:
    """The task and text columns, from the schema or else the canonical column names (labels need not be a
    ClassLabel here: tokenizing and corrupting do not need their names)."""
    if schema is not None:
        return schema.task_type, schema.text_columns
    columns = set(first_split(dataset).column_names)
    if {TOKENS, TAGS} <= columns:
        return TOKEN_CLS, ()
    if {TEXT, LABEL} <= columns:
        return SEQ_CLS, (TEXT, TEXT_PAIR) if TEXT_PAIR in columns else (TEXT,)
    return schema_of(dataset).task_type, ()  # raises, naming the columns found


def tokenize_sequence_classification(
    dataset: Dataset | DatasetDict, tokenizer, max_length: int = 512, schema: Optional[DataSchema] = None
) -> Dataset | DatasetDict:
    """``text`` (and ``text_pair``, encoded as a pair) -> ``input_ids``/``attention_mask`` truncated to
    ``max_length``, ``label`` -> ``labels``.

    No padding here: a collator pads each batch to its own longest row. A pair is truncated longest text first.
    """
    pair = len(_task_and_texts(dataset, schema)[1]) == 2
    separator = PAIR_SEPARATOR if pair and not _pair_has_separator(tokenizer) else ""

    def encode(batch):
        second = [separator + text for text in batch[TEXT_PAIR]] if pair else None
        encoded = tokenizer(batch[TEXT], second, truncation=True, max_length=max_length)
        encoded["labels"] = batch[LABEL]
        return encoded

    return dataset.map(encode, batched=True, remove_columns=_column_names(dataset))


def _pair_has_separator(tokenizer) -> bool:
    """Whether encoding a pair adds special tokens beyond those of one text (BERT's [SEP]): then the texts are kept
    apart already."""
    return tokenizer.num_special_tokens_to_add(pair=True) > tokenizer.num_special_tokens_to_add(pair=False)


def tokenize_token_classification(
    dataset: Dataset | DatasetDict, tokenizer, max_length: int = 512
) -> Dataset | DatasetDict:
    """Tokenize pre-split ``tokens`` and align ``ner_tags`` to the sub-tokens as ``labels``.

    A word's tag goes on its first sub-token; its other sub-tokens and the special tokens get -100, so the loss and
    the span metrics count every word once. A word the tokenizer deletes entirely is encoded as its unknown token,
    so that it keeps its tag; words cut off by ``max_length`` lose theirs. Needs a fast tokenizer (``word_ids()``).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "Token classification needs a fast tokenizer, whose word_ids() maps sub-tokens back to words; load it "
            "with AutoTokenizer.from_pretrained(..., use_fast=True)."
        )
    word_prefix = " " if _space_marks_word_start(tokenizer) else ""

    def encode(batch):
        words = [[word_prefix + word for word in sentence] for sentence in batch[TOKENS]]
        encoded = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
        vanished = {row: _vanished_words(encoded, row, len(words[row]), max_length) for row in range(len(words))}
        if tokenizer.unk_token is not None and any(vanished.values()):
            for row, positions in vanished.items():
                for position in positions:
                    words[row][position] = word_prefix + tokenizer.unk_token
            encoded = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
        encoded["labels"] = [
            _align_labels(encoded.word_ids(row), tags) for row, tags in enumerate(batch[TAGS])
        ]
        return encoded

    return dataset.map(encode, batched=True, remove_columns=_column_names(dataset))


def _vanished_words(encoded, row: int, num_words: int, max_length: int) -> list[int]:
    """Words that got no sub-token although not truncated away, to be replaced by the unknown token.

    BERT's normalizer deletes some characters outright (a lone U+FE0F emoji selector in WNUT-17 dev/test); such a
    word would silently lose its tag, and an entity made of it would vanish from the gold spans.
    """
    present = {word for word in encoded.word_ids(row) if word is not None}
    truncated = len(encoded["input_ids"][row]) >= max_length
    last_kept = max(present, default=-1) if truncated else num_words - 1
    return [word for word in range(last_kept + 1) if word not in present]


def _space_marks_word_start(tokenizer) -> bool:
    """Whether the tokenizer encodes a word's leading space into its first sub-token.

    Byte-level BPE (GPT-2, Llama 3, SmolLM2) and SentencePiece's Metaspace do; for them a pre-split word must be
    given its space, as ``add_prefix_space=True`` would, or it is encoded as if glued to the previous word
    (transformers 5 does so silently). Prefixing the space ourselves works whatever the tokenizer's options.
    """
    pre_tokenizer = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    steps = pre_tokenizer["pretokenizers"] if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    return any(step.get("type") in ("ByteLevel", "Metaspace") for step in steps)


def _align_labels(word_ids: list[int | None], tags: list[int]) -> list[int]:
    labels = []
    previous_word = None
    for word in word_ids:
        labels.append(IGNORE_INDEX if word is None or word == previous_word else tags[word])
        previous_word = word
    return labels


def _column_names(dataset: Dataset | DatasetDict) -> list[str]:
    if isinstance(dataset, DatasetDict):
        return next(iter(dataset.values())).column_names
    return dataset.column_names


def k_shot_subset(dataset: Dataset, shots: int, seed: int, schema: Optional[DataSchema] = None) -> Dataset:
    """A seeded, stratified subset of ``shots`` examples, for the paper's 200/500/1000-sample settings.

    Stratified by label for sequence tasks and by each sentence's most frequent entity type (or 'none') for token
    tasks, with each stratum's share as in the full split. The same (split, shots, seed) always gives the same subset.
    """
    if isinstance(dataset, DatasetDict):
        raise TypeError("k_shot_subset samples one split: pass e.g. dataset_dict['train'].")
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 1:
        raise ValueError(f"shots must be a positive integer, got {shots!r}.")
    if shots > len(dataset):
        raise ValueError(
            f"Asked for {shots} shots but the split has only {len(dataset)} examples; use shots <= {len(dataset)}."
        )
    return dataset.select(stratified_sample(stratification_keys(dataset, schema), int(shots), seed))


def evaluation_subset(dataset: Dataset, size: Optional[int]) -> Dataset:
    """``size`` examples of a dev or test split drawn under a fixed seed (the same for every run), or the whole
    split when ``size`` is None or not smaller; bounds the cost of smoke runs and of sampling methods on a CPU."""
    if size is None or size >= len(dataset):
        return dataset
    return dataset.shuffle(seed=EVALUATION_SUBSET_SEED).select(range(size))


def corrupt_missing(
    dataset: Dataset | DatasetDict,
    rate: float,
    seed: int,
    mode: str = "drop",
    mask_string: str = "[MASK]",
    schema: Optional[DataSchema] = None,
) -> Dataset | DatasetDict:
    """Drop, or replace by ``mask_string``, a ``rate`` fraction of the words of every example.

    For the paper's missing-information robustness study. Sequence tasks lose whitespace-separated words of ``text``
    (the spacing around the other words, and SemEval's ``<e1>`` ``<e2>`` markers, are kept); token tasks lose
    ``tokens`` together with their tags (``drop``) or keep the tag of a masked token (``mask``). Each example has ``rate * n_words`` words hit, the fractional part
    drawn at random so the rate holds on average over short examples too; ``drop`` leaves at least one word, since an
    empty input has nothing to classify. Draws come from a generator seeded with (seed, example index), so results
    do not depend on batching, and ``drop`` and ``mask`` hit the same words (unless ``drop`` must spare one). Both
    texts of a sentence pair are corrupted, each with its own draws.
    """
    task_type, text_columns = _task_and_texts(dataset, schema)
    if mode not in CORRUPTION_MODES:
        raise ValueError(f"mode must be one of {CORRUPTION_MODES}, got {mode!r}.")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be a fraction of words between 0 and 1, got {rate!r}.")
    if not mask_string:
        raise ValueError("mask_string must be a non-empty string.")
    keep_one = mode == "drop"

    def corrupt_one_text(text, index, stream):
        pieces = _TEXT_SEPARATORS.split(text)  # words at even positions, separators between them
        word_positions = [position for position in range(0, len(pieces), 2) if pieces[position]]
        for word in _words_to_hit(len(word_positions), rate, seed, index, keep_one, stream):
            position = word_positions[word]
            if mode == "mask":
                pieces[position] = mask_string
                continue
            pieces[position] = ""
            if position + 1 < len(pieces) and pieces[position + 1].isspace():
                pieces[position + 1] = ""
            elif position > 0 and pieces[position - 1].isspace():
                pieces[position - 1] = ""
        return "".join(pieces)

    def corrupt_text(example, index):
        return {column: corrupt_one_text(example[column], index, stream) for stream, column in
                enumerate(text_columns)}

    def corrupt_tokens(example, index):
        hit = _words_to_hit(len(example[TOKENS]), rate, seed, index, keep_one)
        if mode == "mask":
            tokens = [mask_string if position in hit else token for position, token in enumerate(example[TOKENS])]
            return {TOKENS: tokens}
        kept = [position for position in range(len(example[TOKENS])) if position not in hit]
        return {
            TOKENS: [example[TOKENS][position] for position in kept],
            TAGS: [example[TAGS][position] for position in kept],
        }

    corrupt = corrupt_text if task_type == SEQ_CLS else corrupt_tokens
    return dataset.map(corrupt, with_indices=True)


def _words_to_hit(num_words: int, rate: float, seed: int, index: int, keep_one: bool, stream: int = 0) -> set[int]:
    # the first text's draws are seeded as they always were; the second text of a pair gets a stream of its own
    rng = np.random.default_rng([seed, index] if stream == 0 else [seed, index, stream])
    expected = rate * num_words
    count = int(expected) + int(rng.random() < expected - int(expected))
    if keep_one:
        count = min(count, max(num_words - 1, 0))
    return set(rng.choice(num_words, size=count, replace=False).tolist())
