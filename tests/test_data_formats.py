"""Users' own data in the layouts data sets are released in: tables, CoNLL token files, split folders, in-memory and
hub-builder data; column options, label names, empty documents and sentences, and the errors that name the fix."""

import csv
import gzip
import json
import warnings

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value
from tokenizers.pre_tokenizers import ByteLevel
from transformers import AutoTokenizer, GPT2Tokenizer

from peft_umema.data import DataSchema, load_benchmark, load_data
from peft_umema.data.preprocessing import corrupt_missing, prepare_tokenizer, tokenize_dataset
from peft_umema.data.readers import find_split_files, to_iob2
from peft_umema.experiments.backbones import resolve_backbone

NEWS = [
    ("Shares rose sharply after the bank reported record profits.", "business"),
    ("The striker scored twice in the cup final on Saturday.", "sport"),
    ("Markets fell as oil prices climbed for a third week.", "business"),
    ("The coach praised his team after a narrow win.", "sport"),
    ("A new phone with a folding screen goes on sale today.", "tech"),
    ("The chip maker unveiled a faster processor for laptops.", "tech"),
]


def sizes(splits):
    return {split: len(dataset) for split, dataset in splits.items()}


def write_csv(path, header, rows, delimiter=","):
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def news_rows(copies):
    return [(f"{text} (report {number})", label) for number in range(copies) for text, label in NEWS]


# CoNLL-2003 as released: four columns (token POS chunk NER), -DOCSTART- lines, IOB1 tags.
CONLL03 = """-DOCSTART- -X- -X- O

EU NNP I-NP I-ORG
rejects VBZ I-VP O
German JJ I-NP I-MISC
call NN I-NP O
to TO I-VP O
boycott VB I-VP O
British JJ I-NP I-MISC
lamb NN I-NP O
. . O O

Peter NNP I-NP I-PER
Blackburn NNP I-NP I-PER

-DOCSTART- -X- -X- O

In IN I-PP O
Germany NNP I-NP I-LOC
and CC O O
France NNP I-NP I-LOC
Spain NNP I-NP B-LOC
. . O O
"""


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return prepare_tokenizer(AutoTokenizer.from_pretrained(resolve_backbone("minilm")))


# ------------------------------------------------------------------------------------------------------------------
# Tables: CSV, TSV, JSON, JSON lines, Parquet; one file or a folder of split files
# ------------------------------------------------------------------------------------------------------------------


def test_csv_folder_with_string_labels_in_a_category_column(tmp_path):
    write_csv(tmp_path / "train.csv", ["text", "category"], news_rows(5))
    write_csv(tmp_path / "test.csv", ["text", "category"], news_rows(1))
    splits, schema = load_data(tmp_path)
    assert schema == DataSchema("SEQ_CLS", ("business", "sport", "tech"), ("text",),
                                source_columns={"text": "text", "label": "category"})
    assert sizes(splits) == {"train": 27, "validation": 3, "test": 6}  # validation carved from train, stratified
    assert splits["test"].features["label"] == ClassLabel(names=["business", "sport", "tech"])
    assert [schema.label_names[i] for i in splits["test"]["label"]] == [label for _, label in NEWS]
    assert splits["test"]["text"][0] == news_rows(1)[0][0]


def test_the_same_csv_as_one_file_gets_train_validation_and_test_carved(tmp_path):
    path = write_csv(tmp_path / "news.csv", ["id", "headline", "section"], [(i, t, l) for i, (t, l) in
                                                                           enumerate(news_rows(5))])
    with pytest.raises(ValueError, match=r"news\.csv: cannot tell which column holds the labels; columns found: "
                                         r"\['id', 'headline', 'section'\]\. Pass label_column=.*--label-column"):
        load_data(path)
    splits, schema = load_data(path, label_column="section")
    assert schema.source_columns == {"text": "headline", "label": "section"}  # the one string column left
    assert sizes(splits) == {"train": 21, "validation": 3, "test": 6}
    assert set(splits["train"]["text"]) | set(splits["validation"]["text"]) | set(splits["test"]["text"]) == {
        text for text, _ in news_rows(5)
    }


@pytest.mark.parametrize("extension", ["tsv", "json", "jsonl", "parquet", "csv.gz"])
def test_every_table_format_as_a_split_folder(tmp_path, extension):
    rows = {"train": news_rows(4), "dev": news_rows(1), "test": news_rows(1)}
    for split, split_rows in rows.items():
        records = [{"sentence": text, "intent": label} for text, label in split_rows]
        path = tmp_path / f"{split}.{extension}"
        if extension == "tsv":
            write_csv(path, ["sentence", "intent"], split_rows, delimiter="\t")
        elif extension == "json":
            path.write_text(json.dumps(records), encoding="utf-8")  # one JSON array
        elif extension == "jsonl":
            write_jsonl(path, records)
        elif extension == "parquet":
            Dataset.from_list(records).to_parquet(str(path))
        else:
            with gzip.open(path, "wt", encoding="utf-8", newline="") as file:
                csv.writer(file).writerows([["sentence", "intent"], *split_rows])
    (tmp_path / "README.md").write_text("# intents\n")
    splits, schema = load_data(tmp_path)
    assert sizes(splits) == {"train": 24, "validation": 6, "test": 6}  # dev.* is the validation split
    assert schema.label_names == ("business", "sport", "tech")
    assert schema.source_columns == {"text": "sentence", "label": "intent"}


def test_split_file_names_in_release_layouts(tmp_path):
    for name in ("eng.train", "eng.testa", "eng.testb", "train-00000-of-00002.parquet", "train-00001-of-00002.parquet",
                 "LICENSE", "SOURCE.txt"):
        (tmp_path / name).write_text("x")
    found = {split: [path.name for path in paths] for split, paths in find_split_files(tmp_path).items()}
    assert found == {
        "train": ["eng.train", "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"],
        "validation": ["eng.testa"],
        "test": ["eng.testb"],
    }
    (tmp_path / "train_dev.csv").write_text("x")
    with pytest.raises(ValueError, match=r"train_dev\.csv: the file name names several splits"):
        find_split_files(tmp_path)


def test_label_names_fix_the_order_and_name_integer_ids(tmp_path):
    path = write_csv(tmp_path / "news.csv", ["text", "label"], news_rows(3))
    _, schema = load_data(path, label_names="tech,sport,business")
    assert schema.label_names == ("tech", "sport", "business")
    with pytest.raises(ValueError, match=r"news\.csv: 'label' holds labels that are not among the label_names given: "
                                         r"'tech'"):
        load_data(path, label_names=["business", "sport"])

    ids = write_csv(tmp_path / "ids.csv", ["text", "label"], [(t, ["business", "sport", "tech"].index(l) + 1)
                                                              for t, l in news_rows(3)])
    splits, schema = load_data(ids)  # integer classes 1..3, named by their digits
    assert schema.label_names == ("1", "2", "3")
    splits, schema = load_data(ids, label_names=["none", "business", "sport", "tech"])
    assert schema.label_names == ("none", "business", "sport", "tech")
    test = splits["test"]
    assert {schema.label_names[label] for label in test["label"]} == {"business", "sport", "tech"}
    with pytest.raises(ValueError, match=r"ids\.csv: 'label' holds the ids 3, beyond the 3 label_names given"):
        load_data(ids, label_names=["a", "b", "c"])
    # one empty cell makes pandas read the ids as floats: still ids, and the empty cell is named
    gap = write_csv(tmp_path / "gap.csv", ["text", "label"], [(t, i % 3) for i, (t, _) in enumerate(news_rows(3))]
                    + [("no label here", "")])
    with pytest.raises(ValueError, match=r"gap\.csv, row 19: no label in column 'label'"):
        load_data(gap)


def test_errors_name_the_file_the_columns_and_the_option(tmp_path):
    path = write_csv(tmp_path / "scores.csv", ["review", "stars"], [("good", 4.5), ("bad", 1.0)] * 10)
    with pytest.raises(ValueError, match=r"scores\.csv: cannot tell which column holds the labels; columns found: "
                                         r"\['review', 'stars'\]"):
        load_data(path)
    with pytest.raises(ValueError, match=r"scores\.csv: the label column 'stars' holds numbers \(float64\), not classes"):
        load_data(path, label_column="stars")
    with pytest.raises(ValueError, match=r"scores\.csv: no column 'rating'; columns found: \['review', 'stars'\]"):
        load_data(path, label_column="rating")

    (tmp_path / "split").mkdir()
    write_csv(tmp_path / "split" / "train.csv", ["text", "label"], news_rows(3))
    write_csv(tmp_path / "split" / "test.csv", ["body", "label"], news_rows(1))
    with pytest.raises(ValueError, match=r"test\.csv: no column 'text' \(found \['body', 'label'\]\)"):
        load_data(tmp_path / "split")

    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"text": "fine", "label": "a"}\n{"text": "cut off\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.jsonl: cannot be read as JSON"):
        load_data(bad)

    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "notes.md").write_text("nothing here")
    with pytest.raises(ValueError, match=r"Cannot recognise the data in .*odd \(it holds \['notes\.md'\]\)"):
        load_data(odd)


def test_column_options_do_not_apply_to_benchmarks(shared_data):
    with pytest.raises(ValueError, match=r"wnut17 is read by its benchmark reader.*label_column"):
        load_data(shared_data / "wnut17", label_column="category")


# ------------------------------------------------------------------------------------------------------------------
# Sentence pairs
# ------------------------------------------------------------------------------------------------------------------


def pair_rows():
    return [
        ("A man is playing a guitar.", "A person plays an instrument.", "entailment"),
        ("A man is playing a guitar.", "Nobody is making music.", "contradiction"),
        ("Two dogs run on the beach.", "Animals are outside.", "entailment"),
        ("Two dogs run on the beach.", "The cats sleep indoors.", "contradiction"),
    ] * 5


def test_sentence_pairs_are_found_and_tokenized_as_pairs(tmp_path, minilm_tokenizer):
    path = write_csv(tmp_path / "nli.csv", ["premise", "hypothesis", "label"], pair_rows())
    splits, schema = load_data(path)
    assert schema.is_pair and schema.text_columns == ("text", "text_pair")
    assert schema.source_columns == {"text": "premise", "label": "label", "text_pair": "hypothesis"}
    row = splits["train"][0]
    encoded = tokenize_dataset(splits["train"].select([0]), minilm_tokenizer, schema=schema)[0]
    tokens = minilm_tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    first = minilm_tokenizer.tokenize(row["text"])
    second = minilm_tokenizer.tokenize(row["text_pair"])
    assert tokens == ["[CLS]", *first, "[SEP]", *second, "[SEP]"]
    assert encoded["token_type_ids"] == [0] * (len(first) + 2) + [1] * (len(second) + 1)

    # by name, in any order, and the columns can be chosen
    swapped, swapped_schema = load_data(path, text_column=["hypothesis", "premise"])
    assert swapped["train"][0]["text"] == row["text_pair"]
    # both texts of a pair are corrupted
    dropped = corrupt_missing(splits["train"], 0.5, seed=0, schema=schema)
    assert all(len(new["text"].split()) < len(old["text"].split()) and
               len(new["text_pair"].split()) < len(old["text_pair"].split())
               for new, old in zip(dropped, splits["train"]))


def test_a_release_with_each_split_in_two_formats_reads_one(tmp_path):
    # SNLI 1.0 ships every split as .jsonl and as a tab-separated .txt
    for split in ("train", "dev", "test"):
        records = [{"sentence1": a, "sentence2": b, "gold_label": label, "pairID": str(i)}
                   for i, (a, b, label) in enumerate(pair_rows())]
        write_jsonl(tmp_path / f"snli_1.0_{split}.jsonl", records)
        write_csv(tmp_path / f"snli_1.0_{split}.txt", ["gold_label", "sentence1", "sentence2"],
                  [(label, a, b) for a, b, label in pair_rows()], delimiter="\t")
    with pytest.warns(UserWarning, match=r"reading snli_1\.0_train\.jsonl and leaving out snli_1\.0_train\.txt"):
        splits, schema = load_data(tmp_path, label_column="gold_label")
    assert schema.is_pair and schema.label_names == ("contradiction", "entailment")
    assert sizes(splits) == {"train": 20, "validation": 20, "test": 20}


def test_pairs_stay_apart_with_a_byte_level_tokenizer():
    vocab = {"<|endoftext|>": 0}
    for character in sorted(ByteLevel.alphabet()):
        vocab[character] = len(vocab)
    tokenizer = prepare_tokenizer(GPT2Tokenizer(vocab=vocab, merges=[]))
    schema = DataSchema("SEQ_CLS", ("x",), ("text", "text_pair"))
    rows = Dataset.from_dict({"text": ["ab"], "text_pair": ["cd"], "label": [0]},
                             features=Features({"text": Value("string"), "text_pair": Value("string"),
                                                "label": ClassLabel(names=["x"])}))
    encoded = tokenize_dataset(rows, tokenizer, schema=schema)[0]
    # GPT-2 puts nothing between the texts of a pair; a newline keeps "ab" and "cd" from reading as "abcd"
    assert tokenizer.convert_ids_to_tokens(encoded["input_ids"]) == ["a", "b", "Ċ", "c", "d"]


# ------------------------------------------------------------------------------------------------------------------
# CoNLL-style token files
# ------------------------------------------------------------------------------------------------------------------


def test_conll03_folder_with_four_columns_docstart_and_iob1(tmp_path):
    for name in ("train.txt", "dev.txt", "test.txt"):
        (tmp_path / name).write_text(CONLL03, encoding="utf-8")
    splits, schema = load_data(tmp_path)
    assert sizes(splits) == {"train": 3, "validation": 3, "test": 3}  # -DOCSTART- lines are not sentences
    assert schema.task_type == "TOKEN_CLS"
    assert schema.label_names == ("O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER")
    names = schema.label_names
    sentences = [[names[tag] for tag in tags] for tags in splits["train"]["ner_tags"]]
    assert splits["train"]["tokens"][0] == ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."]
    assert sentences[0] == ["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O"]
    assert sentences[1] == ["B-PER", "I-PER"]
    # IOB1's B- separates two adjacent entities of one type: France and Spain stay two locations
    assert sentences[2] == ["O", "B-LOC", "O", "B-LOC", "B-LOC", "O"]


def test_conll_single_file_and_tag_schemes(tmp_path):
    path = tmp_path / "ner.conll"
    path.write_text("Ann\tS-PER\nmet\tO\nNew\tB-LOC\nYork\tE-LOC\n\n" * 10, encoding="utf-8")
    splits, schema = load_data(path)
    assert sum(sizes(splits).values()) == 10
    tags = [schema.label_names[tag] for tag in splits["train"][0]["ner_tags"]]
    assert tags == ["B-PER", "O", "B-LOC", "I-LOC"]
    assert to_iob2(["I-PER", "I-PER", "B-PER", "O", "I-LOC"]) == ["B-PER", "I-PER", "B-PER", "O", "B-LOC"]
    assert to_iob2(["B-ORG", "I-ORG", "I-LOC"]) == ["B-ORG", "I-ORG", "B-LOC"]

    (tmp_path / "pos.conll").write_text("The DT\ncat NN\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"pos\.conll, line 1: the last column must be an entity tag.*'DT'"):
        load_data(tmp_path / "pos.conll")
    (tmp_path / "docs.conll").write_text("-DOCSTART- O\n\n-DOCSTART- O\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"docs\.conll: no sentences"):
        load_data(tmp_path / "docs.conll")


def test_a_tsv_token_file_is_read_as_conll(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("Paris\tB-LOC\nis\tO\nbig\tO\n\n" * 10, encoding="utf-8")
    _, schema = load_data(path)
    assert schema.task_type == "TOKEN_CLS" and schema.label_names == ("O", "B-LOC", "I-LOC")


def test_jsonl_tokens_with_custom_column_names(tmp_path):
    records = [{"id": i, "toks": ["Obama", "visited", "Paris"], "ner": ["B-PER", "O", "B-LOC"]} for i in range(10)]
    path = write_jsonl(tmp_path / "ner.jsonl", records)
    with pytest.raises(ValueError, match=r"ner\.jsonl: cannot tell which column holds the labels; columns found: "
                                         r"\['id', 'toks', 'ner'\]"):
        load_data(path)
    splits, schema = load_data(path, tokens_column="toks", tags_column="ner")
    assert schema.source_columns == {"tokens": "toks", "ner_tags": "ner"}
    assert schema.label_names == ("O", "B-LOC", "I-LOC", "B-PER", "I-PER")
    assert splits["train"][0]["tokens"] == ["Obama", "visited", "Paris"]
    # the common names are found without options
    words = write_jsonl(tmp_path / "words.jsonl", [{"words": r["toks"], "labels": r["ner"]} for r in records])
    assert load_data(words).schema.source_columns == {"tokens": "words", "ner_tags": "labels"}
    mismatch = write_jsonl(tmp_path / "bad.jsonl", [{"tokens": ["a", "b"], "tags": ["O"]}] * 4)
    with pytest.raises(ValueError, match=r"bad\.jsonl, row 1: 2 tokens in 'tokens' but 1 tags in 'tags'"):
        load_data(mismatch)
    ids = write_jsonl(tmp_path / "ids.jsonl", [{"tokens": ["Ann", "runs"], "ner_tags": [1, 0]}] * 10)
    with pytest.raises(ValueError, match=r"integer ids without names; pass label_names=O,B-PER"):
        load_data(ids)
    assert load_data(ids, label_names="O,B-PER,I-PER").schema.label_names == ("O", "B-PER", "I-PER")


# ------------------------------------------------------------------------------------------------------------------
# In-memory data, hub builders, saved data sets
# ------------------------------------------------------------------------------------------------------------------


def test_a_datasetdict_with_a_dev_split_and_string_labels():
    texts, labels = zip(*news_rows(4))
    data = DatasetDict({
        "train": Dataset.from_dict({"content": list(texts), "class": list(labels)}),
        "dev": Dataset.from_dict({"content": list(texts[:6]), "class": list(labels[:6])}),
    })
    splits, schema = load_data(data, test_fraction=0.25)
    assert sizes(splits) == {"train": 18, "validation": 6, "test": 6}
    assert schema.source_columns == {"text": "content", "label": "class"}


def test_hub_style_classlabels_keep_their_names_and_unlabelled_test_splits_are_carved():
    features = Features({"sentence": Value("string"), "label": ClassLabel(names=["negative", "positive"]),
                         "idx": Value("int32")})
    train = Dataset.from_dict({"sentence": ["good", "bad", "fine", "awful"] * 5, "label": [1, 0, 1, 0] * 5,
                               "idx": list(range(20))}, features=features)
    test = Dataset.from_dict({"sentence": ["so-so"] * 4, "label": [-1] * 4, "idx": list(range(4))},
                             features=features)
    with pytest.warns(UserWarning, match="every label is -1"):
        splits, schema = load_data(DatasetDict({"train": train, "test": test}))
    assert schema.label_names == ("negative", "positive") and len(splits["test"]) == 4
    assert "so-so" not in splits["test"]["text"]


def test_the_csv_builder_by_name_accepts_string_labels(tmp_path):
    write_csv(tmp_path / "train.csv", ["text", "category"], news_rows(4))
    write_csv(tmp_path / "test.csv", ["text", "category"], news_rows(1))
    files = {"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv")}
    splits = load_benchmark("csv", data_files=files)
    assert splits["test"].features["label"].names == ["business", "sport", "tech"]
    assert sizes(splits) == {"train": 22, "validation": 2, "test": 6}


def test_a_save_to_disk_folder(tmp_path):
    features = Features({"tokens": Sequence(Value("string")),
                         "ner_tags": Sequence(ClassLabel(names=["O", "B-PER", "I-PER", "B-ORG", "I-ORG"]))})
    data = DatasetDict({split: Dataset.from_dict({"tokens": [["Ann", "joined", "Acme"]] * 5,
                                                  "ner_tags": [[1, 0, 3]] * 5}, features=features)
                        for split in ("train", "validation", "test")})
    data.save_to_disk(str(tmp_path / "saved"))
    splits, schema = load_data(tmp_path / "saved")
    assert schema.label_names == ("O", "B-PER", "I-PER", "B-ORG", "I-ORG")  # the data set's own tag order
    assert splits["test"][0]["ner_tags"] == [1, 0, 3]


# ------------------------------------------------------------------------------------------------------------------
# Empty documents and sentences, domain lists, damaged archives (issue 10)
# ------------------------------------------------------------------------------------------------------------------


def test_empty_documents_are_named_or_skipped_with_a_count(tmp_path):
    rows = news_rows(4)
    rows[3] = ("", rows[3][1])
    rows[7] = ("   ", rows[7][1])
    path = write_csv(tmp_path / "news.csv", ["text", "category"], rows)
    with pytest.raises(ValueError, match=r"news\.csv: 2 empty documents \(row 4, 8\).*skip_empty=True "
                                         r"\(--skip-empty on the command line\)"):
        load_data(path)
    with pytest.warns(UserWarning, match=r"news\.csv: skipped 2 empty documents"):
        splits, _ = load_data(path, skip_empty=True)
    assert sum(sizes(splits).values()) == 22

    empty_sentence = write_jsonl(tmp_path / "ner.jsonl", [{"tokens": ["Ann"], "tags": ["B-PER"]}] * 9 +
                                 [{"tokens": [], "tags": []}])
    with pytest.raises(ValueError, match=r"ner\.jsonl: 1 empty sentences \(no tokens\) \(row 10\)"):
        load_data(empty_sentence)


def test_an_empty_document_in_class_folders_is_named(tmp_path):
    for label in ("neg", "pos"):
        (tmp_path / label).mkdir()
        for number in range(3):
            (tmp_path / label / f"{number}.txt").write_text(f"a {label} review number {number}")
    (tmp_path / "pos" / "3.txt").write_text("\n")
    with pytest.raises(ValueError, match=r"1 empty document\(s\) in .*: .*pos/3\.txt"):
        load_data(tmp_path, validation_fraction=0.34, test_fraction=0.34)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits, schema = load_data(tmp_path, validation_fraction=0.34, test_fraction=0.34, skip_empty=True)
    assert any("Skipped 1 empty document(s)" in str(warning.message) for warning in caught)
    assert sum(sizes(splits).values()) == 6 and schema.label_names == ("neg", "pos")


def test_class_folders_per_split(tmp_path):
    # aclImdb-like: <split>/<class>/*.txt
    for split, count in (("train", 4), ("test", 2)):
        for label in ("neg", "pos"):
            (tmp_path / split / label).mkdir(parents=True)
            for number in range(count):
                (tmp_path / split / label / f"{number}.txt").write_text(f"{split} {label} review {number}")
    splits, schema = load_data(tmp_path, validation_fraction=0.25)
    assert schema.label_names == ("neg", "pos")
    assert sizes(splits) == {"train": 6, "validation": 2, "test": 4}
    assert all(text.startswith("test ") for text in splits["test"]["text"])


@pytest.mark.parametrize("name", ["ploner:", "ploner: ", "ploner:onbc,"])
def test_an_empty_ploner_domain_list_is_an_error(shared_data, name):
    with pytest.raises(ValueError, match="empty PLONER domain list"):
        load_data(name, data_root=shared_data)


def test_a_truncated_archive_is_named(shared_data, tmp_path):
    archive = (shared_data / "20newsgroups" / "20news-bydate.tar.gz").read_bytes()
    truncated = tmp_path / "20news-bydate.tar.gz"
    truncated.write_bytes(archive[: 200_000])
    with pytest.raises(ValueError, match=r"20news-bydate\.tar\.gz: the archive cannot be read, it is damaged or "
                                         r"truncated"):
        load_data(truncated)
