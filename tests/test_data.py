"""Loaders on the real benchmark files, format detection, malformed-file errors, tokenization and sampling."""

import collections
import re
import tarfile

import datasets
import numpy as np
import pytest
from tokenizers.pre_tokenizers import ByteLevel
from transformers import AutoTokenizer, GPT2Tokenizer

from peft_umema.data.loaders import (
    SEMEVAL_LABELS,
    bio_label_names,
    default_data_root,
    label_names_of,
    load_benchmark,
    stratification_keys,
    task_type_of,
)
from peft_umema.data.preprocessing import (
    IGNORE_INDEX,
    corrupt_missing,
    k_shot_subset,
    prepare_tokenizer,
    tokenize_dataset,
)
from peft_umema.experiments.backbones import resolve_backbone


def sizes(dataset_dict):
    return {split: len(dataset) for split, dataset in dataset_dict.items()}


def write_lines(path, lines, newline="\n"):
    path.write_bytes(newline.join(lines).encode("utf-8") + newline.encode())
    return path


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return prepare_tokenizer(AutoTokenizer.from_pretrained(resolve_backbone("minilm")))


@pytest.fixture
def wnut17(shared_data):
    return load_benchmark(shared_data / "wnut17")


@pytest.fixture
def semeval(shared_data):
    return load_benchmark(shared_data / "semeval2010_task8")


# ------------------------------------------------------------------------------------------------------------------
# Real data
# ------------------------------------------------------------------------------------------------------------------


def test_wnut17_splits_on_tab_only_separator_lines(wnut17):
    # 2,394 of the train separators are a lone TAB: read as token lines they would glue sentences together
    assert sizes(wnut17) == {"train": 3394, "validation": 1009, "test": 1287}
    assert sum(len(tokens) for tokens in wnut17["train"]["tokens"]) == 62730
    assert task_type_of(wnut17) == "TOKEN_CLS"
    names = label_names_of(wnut17)
    assert names[0] == "O" and len(names) == 13
    assert names[1:3] == ["B-corporation", "I-corporation"]
    assert names == bio_label_names(names[::-1])


def test_ploner_one_domain_and_several(shared_data):
    connl03 = load_benchmark("ploner", data_root=shared_data)
    assert sizes(connl03) == {"train": 1750, "validation": 250, "test": 500}
    assert sum(map(len, connl03["train"]["tokens"])) == 28440
    assert label_names_of(connl03) == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    two = load_benchmark("ploner:onbc,onnw", data_root=shared_data)
    assert sizes(two) == {"train": 3500, "validation": 500, "test": 1001}  # onbc_test has 501 sentences
    with pytest.raises(FileNotFoundError, match="connl03"):
        load_benchmark("ploner:nowhere", data_root=shared_data)


def test_semeval_keeps_markers_and_carves_a_stratified_validation(semeval):
    assert sizes(semeval) == {"train": 7200, "validation": 800, "test": 2717}
    assert label_names_of(semeval) == list(SEMEVAL_LABELS) and SEMEVAL_LABELS[0] == "Other"
    first = semeval["test"][0]
    assert "<e1>" in first["text"] and "</e2>" in first["text"] and not first["text"].startswith('"')
    train_counts = collections.Counter(stratification_keys(semeval["train"]))
    validation_counts = collections.Counter(stratification_keys(semeval["validation"]))
    # the one Entity-Destination(e2,e1) example stays in train; other classes keep their share (1/9 of train)
    assert train_counts["Entity-Destination(e2,e1)"] == 1
    assert validation_counts["Other"] == 141 and train_counts["Other"] == 1410 - 141


def test_carved_validation_depends_on_the_seed_only(shared_data):
    root = shared_data / "semeval2010_task8"
    first, again, other = (list(load_benchmark(root, seed=seed)["validation"]["text"]) for seed in (0, 0, 1))
    assert first == again
    assert first != other


def test_20newsgroups_from_the_archive_and_from_extracted_folders(shared_data, tmp_path):
    news = load_benchmark("20newsgroups", data_root=shared_data)
    assert sizes(news) == {"train": 10183, "validation": 1131, "test": 7532}
    assert len(label_names_of(news)) == 20 and label_names_of(news)[0] == "alt.atheism"
    assert task_type_of(news) == "SEQ_CLS"

    # a small extracted slice: the first 3 messages of two groups in each split, read like the archive
    picked = collections.Counter()
    with tarfile.open(shared_data / "20newsgroups" / "20news-bydate.tar.gz") as archive:
        for member in archive:
            split_dir, group, *_ = member.name.split("/") + [""]
            if member.isfile() and group in ("sci.med", "rec.autos") and picked[split_dir, group] < 3:
                picked[split_dir, group] += 1
                archive.extract(member, tmp_path, filter="data")
    sliced = load_benchmark(tmp_path, validation_fraction=0.34)
    assert label_names_of(sliced) == ["rec.autos", "sci.med"]
    assert sizes(sliced) == {"train": 4, "validation": 2, "test": 6}
    assert all(text.startswith("From:") for text in sliced["test"]["text"])


def test_demo_sets_come_from_the_pypi_packages():
    wnut16 = load_benchmark("wnut16_demo")
    assert sum(sizes(wnut16).values()) == 2394 and len(label_names_of(wnut16)) == 21
    assert sizes(wnut16)["test"] == round(0.2 * 2394)
    bbc = load_benchmark("bbc_news_demo", seed=3)
    assert sum(sizes(bbc).values()) == 2225
    assert label_names_of(bbc) == ["business", "entertainment", "politics", "sports", "tech"]
    assert any("\xa315.8m" in text for split in bbc.values() for text in split["text"])  # the one latin-1 file


@pytest.mark.parametrize(
    "relative_path, expected_task, expected_train",
    [
        ("wnut17/emerging.dev.conll", "TOKEN_CLS", 3394),
        ("ploner/onbc_dev.txt", "TOKEN_CLS", 1750),
        ("ploner", "TOKEN_CLS", 1750),
        ("semeval2010_task8/TRAIN_FILE.TXT", "SEQ_CLS", 7200),
    ],
)
def test_local_paths_are_recognised(shared_data, relative_path, expected_task, expected_train):
    loaded = load_benchmark(str(shared_data / relative_path))
    assert task_type_of(loaded) == expected_task
    assert len(loaded["train"]) == expected_train


def test_class_folders_and_single_bio_files_are_recognised(tmp_path):
    for label, texts in {"pos": ["good", "great", "fine"], "neg": ["bad", "awful", "poor"]}.items():
        (tmp_path / "docs" / label).mkdir(parents=True)
        for index, text in enumerate(texts):
            (tmp_path / "docs" / label / f"{index}.txt").write_text(text)
    folders = load_benchmark(tmp_path / "docs", validation_fraction=0.34, test_fraction=0.34)
    assert label_names_of(folders) == ["neg", "pos"] and sizes(folders) == {"train": 2, "validation": 2, "test": 2}

    lines = []
    for index in range(10):
        lines += [f"word{index}\tO", "Paris\tB-LOC" if index % 2 else "Ann\tB-PER", ""]
    single = load_benchmark(write_lines(tmp_path / "tiny.conll", lines))
    assert sizes(single) == {"train": 7, "validation": 1, "test": 2}
    assert label_names_of(single) == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


def test_data_root_comes_from_the_environment(monkeypatch, tmp_path):
    wnut_dir = tmp_path / "wnut17"
    wnut_dir.mkdir()
    for file_name in ("wnut17train.conll", "emerging.dev.conll", "emerging.test.annotated"):
        write_lines(wnut_dir / file_name, ["Ann\tB-person", "runs\tO", "\t", "Bob\tB-person"])
    monkeypatch.setenv("PEFT_UMEMA_DATA", str(tmp_path))
    assert default_data_root() == tmp_path
    assert sizes(load_benchmark("wnut17")) == {"train": 2, "validation": 2, "test": 2}


def test_unknown_names_fall_back_to_the_hub_with_a_clear_error(monkeypatch):
    def unreachable(name, **kwargs):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(ConnectionError, match="Hub could not be reached.*local path"):
        load_benchmark("someone/some_ner_set")


# ------------------------------------------------------------------------------------------------------------------
# Malformed files: the error names the file and the 1-based line
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lines, message",
    [
        (["Ann\tB-person", "runs", ""], r"bad\.conll, line 2: expected a token and its tag"),
        (["Ann\tB-person", "", "Bob\t"], r"bad\.conll, line 3: expected a token and its tag"),
        (["Ann B-person ", "runs O ", "fast B_LOC "], r"bad\.conll, line 3: .*entity tag.*'B_LOC'"),
        (["O\tAnn"], r"bad\.conll, line 1: .*entity tag.*'Ann'"),
    ],
)
def test_malformed_bio_lines(tmp_path, lines, message):
    with pytest.raises(ValueError, match=message):
        load_benchmark(write_lines(tmp_path / "bad.conll", lines))


def test_empty_file(tmp_path):
    (tmp_path / "empty.conll").write_text("\n \n")
    with pytest.raises(ValueError, match=r"empty\.conll, line 1: the file is empty"):
        load_benchmark(tmp_path / "empty.conll")


def test_invalid_utf8_names_the_line(tmp_path):
    (tmp_path / "latin.conll").write_bytes(b"Ann\tB-PER\n\nJos\xe9\tB-PER\n")
    with pytest.raises(ValueError, match=r"latin\.conll, line 3: not valid utf-8"):
        load_benchmark(tmp_path / "latin.conll")


GOOD_RECORD = ['1\t"The <e1>author</e1> of a <e2>keygen</e2>."', "Product-Producer(e2,e1)", "Comment:", ""]


@pytest.mark.parametrize(
    "second_record, message",
    [
        (['2\t"A <e1>cup</e1> of <e2>tea</e2>."', "Comment: no label", ""], r"line 6: expected a relation label"),
        (['2\t"A <e1>cup</e1> of <e2>tea</e2>."', ""], r"line 6: missing the relation label"),
        (['2\t"A cup of <e2>tea</e2>."', "Other", ""], r"line 5: the sentence must mark its entities"),
        (["A <e1>cup</e1> of <e2>tea</e2>.", "Other", ""], r"line 5: expected '<id><TAB>"),
        (['2\t"A <e1>cup</e1> of <e2>tea</e2>."', "Other", "Comment:", "Other", ""], r"line 8: expected a blank"),
    ],
)
def test_malformed_semeval_records(tmp_path, second_record, message):
    write_lines(tmp_path / "TRAIN_FILE.TXT", GOOD_RECORD + second_record, newline="\r\n")
    write_lines(tmp_path / "TEST_FILE_FULL.TXT", GOOD_RECORD, newline="\r\n")
    with pytest.raises(ValueError, match=r"TRAIN_FILE\.TXT, " + message):
        load_benchmark(tmp_path)


# ------------------------------------------------------------------------------------------------------------------
# k-shot subsets and corruption
# ------------------------------------------------------------------------------------------------------------------


def test_k_shot_is_stratified_and_seeded(semeval, wnut17):
    train = semeval["train"]
    subset = k_shot_subset(train, 200, seed=0)
    assert len(subset) == 200
    assert list(subset["text"]) == list(k_shot_subset(train, 200, seed=0)["text"])
    assert list(subset["text"]) != list(k_shot_subset(train, 200, seed=1)["text"])
    full_counts = collections.Counter(stratification_keys(train))
    for label, count in collections.Counter(stratification_keys(subset)).items():
        assert abs(count - 200 * full_counts[label] / len(train)) < 1  # largest-remainder quota
    assert len(k_shot_subset(train, len(train), seed=0)) == len(train)

    sentences = wnut17["train"]
    subset = k_shot_subset(sentences, 500, seed=0)
    full_counts = collections.Counter(stratification_keys(sentences))
    assert full_counts["none"] > 0 and full_counts["person"] > 0
    for key, count in collections.Counter(stratification_keys(subset)).items():
        assert abs(count - 500 * full_counts[key] / len(sentences)) < 1


def test_k_shot_rejects_too_many_shots(semeval):
    with pytest.raises(ValueError, match="only 800 examples"):
        k_shot_subset(semeval["validation"], 1000, seed=0)
    with pytest.raises(TypeError, match="one split"):
        k_shot_subset(semeval, 10, seed=0)


def words_of(text):
    return re.sub(r"</?e[12]>", " ", text).split()


def test_corrupt_text_drops_and_masks_the_requested_share(semeval):
    sample = semeval["test"].select(range(200))
    word_counts = np.array([len(words_of(text)) for text in sample["text"]])
    dropped = corrupt_missing(sample, rate=0.3, seed=0, mode="drop")
    masked = corrupt_missing(sample, rate=0.3, seed=0, mode="mask")
    kept = np.array([len(words_of(text)) for text in dropped["text"]])
    hidden = np.array([words_of(text).count("[MASK]") for text in masked["text"]])
    for text in list(dropped["text"]) + list(masked["text"]):  # the entity pair stays marked
        assert all(text.count(marker) == 1 for marker in ("<e1>", "</e1>", "<e2>", "</e2>"))
    assert (word_counts - kept).sum() == pytest.approx(0.3 * word_counts.sum(), rel=0.05)
    assert np.array_equal(word_counts - kept, hidden)  # same words hit in both modes
    assert np.all(np.abs(hidden - 0.3 * word_counts) < 1)
    assert list(dropped["text"]) == list(corrupt_missing(sample, rate=0.3, seed=0)["text"])
    assert list(dropped["text"]) != list(corrupt_missing(sample, rate=0.3, seed=1)["text"])
    assert list(dropped["label"]) == list(sample["label"])
    assert list(corrupt_missing(sample, rate=0.0, seed=0)["text"]) == list(sample["text"])


def test_corrupt_tokens_keeps_tags_aligned(wnut17):
    sample = wnut17["validation"].select(range(100))
    dropped = corrupt_missing(sample, rate=0.5, seed=0, mode="drop")
    masked = corrupt_missing(sample, rate=0.5, seed=0, mode="mask", mask_string="<unk>")
    for original, drop, mask in zip(sample, dropped, masked):
        assert mask["ner_tags"] == original["ner_tags"]
        assert len(drop["tokens"]) == len(drop["ner_tags"]) >= 1
        hit = {i for i, token in enumerate(mask["tokens"]) if token == "<unk>" and original["tokens"][i] != "<unk>"}
        if len(hit) < len(original["tokens"]):  # drop spared no word, so it hit the same words as mask
            kept = [i for i in range(len(original["tokens"])) if i not in hit]
            assert drop["tokens"] == [original["tokens"][i] for i in kept]
            assert drop["ner_tags"] == [original["ner_tags"][i] for i in kept]
    total = sum(map(len, sample["tokens"]))
    assert sum(map(len, dropped["tokens"])) == pytest.approx(0.5 * total, rel=0.05)
    everything = corrupt_missing(sample, rate=1.0, seed=0, mode="drop")
    assert all(len(tokens) == 1 for tokens in everything["tokens"])
    with pytest.raises(ValueError, match="mode"):
        corrupt_missing(sample, rate=0.1, seed=0, mode="shuffle")


# ------------------------------------------------------------------------------------------------------------------
# Tokenization
# ------------------------------------------------------------------------------------------------------------------


def token_dataset(sentences, tags, names):
    features = datasets.Features(
        {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names)),
        }
    )
    return datasets.Dataset.from_dict({"tokens": sentences, "ner_tags": tags}, features=features)


def test_labels_go_on_first_sub_tokens_with_minilm(minilm_tokenizer, wnut17):
    names = ["O", "B-X", "I-X"]
    tiny = token_dataset([["Hello", "worldly", "x"]], [[1, 2, 0]], names)
    encoded = tokenize_dataset(tiny, minilm_tokenizer)[0]
    assert minilm_tokenizer.convert_ids_to_tokens(encoded["input_ids"]) == [
        "[CLS]", "hello", "world", "##ly", "x", "[SEP]"
    ]
    assert encoded["labels"] == [IGNORE_INDEX, 1, 2, IGNORE_INDEX, 0, IGNORE_INDEX]

    # on real tweets every word keeps exactly its tag, in order, on one sub-token: including the lone U+FE0F
    # tokens of the dev file that BERT's normalizer deletes (they become [UNK])
    real = wnut17["validation"].select(range(400, 410))
    for original, row in zip(real, tokenize_dataset(real, minilm_tokenizer)):
        assert [label for label in row["labels"] if label != IGNORE_INDEX] == original["ner_tags"]
        assert set(row) == {"input_ids", "token_type_ids", "attention_mask", "labels"}


def test_truncation_keeps_labels_of_the_kept_words(minilm_tokenizer, wnut17):
    encoded = tokenize_dataset(wnut17["train"].select(range(20)), minilm_tokenizer, max_length=8)
    for original, row in zip(wnut17["train"].select(range(20)), encoded):
        assert len(row["input_ids"]) <= 8
        scored = [label for label in row["labels"] if label != IGNORE_INDEX]
        assert scored == original["ner_tags"][: len(scored)]


def gpt2_style_tokenizer():
    """A byte-level BPE tokenizer of the GPT-2 class: no pad token, words marked by a leading space."""
    vocab = {"<|endoftext|>": 0}
    for character in sorted(ByteLevel.alphabet()):
        vocab[character] = len(vocab)
    merges = [("Ġ", "h"), ("Ġh", "e"), ("l", "l"), ("Ġhe", "ll"), ("Ġhell", "o")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    return GPT2Tokenizer(vocab=vocab, merges=merges)


def test_gpt2_style_tokenizer_gets_pad_token_and_word_prefix_space():
    tokenizer = gpt2_style_tokenizer()
    assert tokenizer.pad_token is None
    prepare_tokenizer(tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>" and tokenizer.padding_side == "right"
    names = ["O", "B-X", "I-X"]
    tiny = token_dataset([["hello", "hello", "xy"]], [[1, 2, 0]], names)
    encoded = tokenize_dataset(tiny, tokenizer)[0]
    # each word is encoded as in running text, with its leading space ("Ġ"), not glued to the previous word
    assert tokenizer.convert_ids_to_tokens(encoded["input_ids"]) == ["Ġhello", "Ġhello", "Ġ", "x", "y"]
    assert encoded["labels"] == [1, 2, 0, IGNORE_INDEX, IGNORE_INDEX]


def test_sequence_tokenization_truncates_and_renames_label(minilm_tokenizer, semeval):
    encoded = tokenize_dataset(semeval["test"].select(range(5)), minilm_tokenizer, max_length=12)
    assert set(encoded.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert all(len(ids) <= 12 for ids in encoded["input_ids"])
    assert list(encoded["labels"]) == list(semeval["test"]["label"])[:5]
