"""`peft-umema train` / `evaluate` and `train(data=...)` on users' own data in release layouts, one run per layout
family, on a tiny random BERT with MiniLM's real tokenizer and slices of real data."""

import csv
import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer, BertConfig, BertModel

from peft_umema.cli import main
from peft_umema.data import load_benchmark
from peft_umema.experiments import runs as run
from peft_umema.experiments.backbones import resolve_backbone

FAST = ["--shots", "40", "--epochs", "1", "--batch-size", "8", "--max-length", "32", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone("minilm"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def bbc():
    return load_benchmark("bbc_news_demo")


def sentences(path: Path, count: int) -> list[list[list[str]]]:
    """The first `count` sentences of a whitespace-separated BIO file, as lists of [token, tag] rows."""
    found, current = [], []
    for line in path.read_text(encoding="utf-8").split("\n"):
        columns = line.split()
        if columns:
            current.append(columns[:1] + columns[-1:])
        elif current:
            found.append(current)
            current = []
            if len(found) == count:
                break
    return found


def iob1(tags: list[str]) -> list[str]:
    """CoNLL-2003's original scheme: B- only where an entity follows another of the same type."""
    out, previous = [], "O"
    for tag in tags:
        if tag.startswith("B-") and previous[2:] != tag[2:]:
            tag = "I-" + tag[2:]
        out.append(tag)
        previous = tag
    return out


def metrics_of(output_dir: Path) -> dict:
    return json.loads((output_dir / run.METRICS_NAME).read_text(encoding="utf-8"))


def test_csv_folder_with_its_own_label_column_name_trains_and_evaluates(tiny_backbone, bbc, tmp_path):
    names = bbc["train"].features["label"].names
    data = tmp_path / "bbc"
    data.mkdir()
    for file_name, split, count in (("train.csv", "train", 120), ("test.csv", "test", 30)):
        with (data / file_name).open("w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(["article", "section"])
            writer.writerows((row["text"], names[row["label"]]) for row in bbc[split].shuffle(seed=0).select(range(count)))
    output_dir = tmp_path / "run"
    code = main(["train", "--model", tiny_backbone, "--data", str(data), "--text-column", "article",
                 "--label-column", "section", "--output-dir", str(output_dir), *FAST])
    assert code == 0
    metrics = metrics_of(output_dir)
    assert metrics["sizes"] == {"train": 40, "validation": 12, "test": 30}
    assert metrics["label_names"] == sorted(set(names)) and 0 <= metrics["test"]["accuracy"] <= 1
    assert metrics["data_schema"]["source_columns"] == {"text": "article", "label": "section"}
    # evaluate reads the training data as train did, without repeating the options
    report = tmp_path / "report.json"
    assert main(["evaluate", str(output_dir), str(data), "--output", str(report), "--no-progress"]) == 0
    evaluated = json.loads(report.read_text(encoding="utf-8"))
    assert evaluated["examples"] == 30
    assert evaluated["metrics"]["accuracy"] == pytest.approx(metrics["test"]["accuracy"])


def test_conll03_folder_with_four_columns_and_docstart_trains(tiny_backbone, shared_data, tmp_path):
    data = tmp_path / "conll2003"
    data.mkdir()
    for split, count in (("train", 150), ("dev", 40), ("test", 40)):
        lines = ["-DOCSTART- -X- -X- O", ""]
        for number, sentence in enumerate(sentences(shared_data / "ploner" / f"connl03_{split}.txt", count)):
            if number and number % 50 == 0:
                lines += ["-DOCSTART- -X- -X- O", ""]
            tokens, tags = [token for token, _ in sentence], iob1([tag for _, tag in sentence])
            lines += [f"{token} NNP I-NP {tag}" for token, tag in zip(tokens, tags)] + [""]
        (data / f"{split}.txt").write_text("\n".join(lines), encoding="utf-8")
    output_dir = tmp_path / "run"
    assert main(["train", "--model", tiny_backbone, "--data", str(data), "--output-dir", str(output_dir), *FAST]) == 0
    metrics = metrics_of(output_dir)
    assert metrics["task_type"] == "TOKEN_CLS" and metrics["sizes"] == {"train": 40, "validation": 40, "test": 40}
    assert metrics["label_names"] == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert 0 <= metrics["test"]["f1"] <= 1


def test_jsonl_with_custom_token_and_tag_columns_trains(tiny_backbone, shared_data, tmp_path):
    path = tmp_path / "wnut.jsonl"
    with path.open("w", encoding="utf-8") as file:
        for sentence in sentences(shared_data / "wnut17" / "wnut17train.conll", 200):
            file.write(json.dumps({"toks": [t for t, _ in sentence], "ner": [g for _, g in sentence]}) + "\n")
    output_dir = tmp_path / "run"
    code = main(["train", "--model", tiny_backbone, "--data", str(path), "--tokens-column", "toks",
                 "--tags-column", "ner", "--output-dir", str(output_dir), *FAST])
    assert code == 0
    metrics = metrics_of(output_dir)
    assert metrics["sizes"] == {"train": 40, "validation": 20, "test": 40}
    assert metrics["data_schema"]["source_columns"] == {"tokens": "toks", "ner_tags": "ner"}
    assert "B-person" in metrics["label_names"]


def test_train_on_a_datasetdict_of_sentence_pairs_and_predict_a_pair(tiny_backbone, bbc, tmp_path):
    names = bbc["train"].features["label"].names

    def pairs(split, count):
        rows = bbc[split].shuffle(seed=0).select(range(count))
        # headline and first paragraph of each article, as a pair, labelled by section name
        parts = [row["text"].split("\n", 2) for row in rows]
        return Dataset.from_dict({
            "question": [part[0] for part in parts],
            "sentence": [part[-1][:300] for part in parts],
            "topic": [names[row["label"]] for row in rows],
        })

    data = DatasetDict({"train": pairs("train", 100), "dev": pairs("validation", 20), "test": pairs("test", 20)})
    output_dir = tmp_path / "run"
    metrics = run.train(tiny_backbone, data, output_dir, shots=40, epochs=1, batch_size=8, max_length=48,
                        progress=False)
    assert metrics["sizes"] == {"train": 40, "validation": 20, "test": 20}
    assert metrics["data_schema"]["text_columns"] == ["text", "text_pair"]
    assert metrics["data_schema"]["source_columns"] == {"text": "question", "text_pair": "sentence", "label": "topic"}
    info = json.loads((output_dir / run.RUN_INFO_NAME).read_text(encoding="utf-8"))
    assert info["data"].startswith("<DatasetDict in memory")
    [result] = run.predict(output_dir, ["Shares rise\tThe bank reported record profits."])
    assert result["label"] in names and 0 <= result["probability"] <= 1
    with pytest.raises(ValueError, match="sentence pairs; give each as the two texts joined by a TAB"):
        run.predict(output_dir, ["no tab here"])
