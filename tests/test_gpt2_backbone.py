"""GPT-2 backbones (whose linear layers are transformers' `Conv1D`) train through `peft-umema train` and `train()`."""

import json

import pytest
import torch
from conftest import SHARED_DATA
from transformers import AutoTokenizer, GPT2Config, GPT2Model

from peft_umema.cli import main
from peft_umema.experiments import runs
from peft_umema.experiments.backbones import resolve_backbone


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> str:
    """A random 2-layer GPT-2 (Conv1D projections) with MiniLM's real WordPiece tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone("minilm"))
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    GPT2Model(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def ner_file(tmp_path_factory) -> str:
    kept, count = [], 0
    for line in (SHARED_DATA / "ploner" / "connl03_train.txt").read_text(encoding="utf-8").splitlines():
        kept.append(line)
        count += not line.strip()
        if count == 120:
            break
    path = tmp_path_factory.mktemp("data") / "ner.txt"
    path.write_text("\n".join(kept) + "\n", encoding="utf-8")
    return str(path)


def test_gpt2_trains_through_the_cli_with_lora_on_its_conv1d_layers(tiny_gpt2, ner_file, tmp_path):
    output_dir = tmp_path / "run"
    code = main(["train", "--model", tiny_gpt2, "--data", ner_file, "--output-dir", str(output_dir), "--shots", "32",
                 "--epochs", "1", "--batch-size", "8", "--max-length", "48", "--no-progress"])
    assert code == 0
    metrics = json.loads((output_dir / runs.METRICS_NAME).read_text())
    assert "f1" in metrics["test"] and metrics["trainable_parameters"] > 0
    targets = set(json.loads((output_dir / "adapter_config.json").read_text())["target_modules"])
    assert {"c_attn", "c_proj", "c_fc"} <= targets


def test_gpt2_trains_through_train(tiny_gpt2, ner_file, tmp_path):
    metrics = runs.train(tiny_gpt2, ner_file, tmp_path / "run", shots=32, epochs=1, batch_size=8, max_length=48,
                         progress=False, method="lora")
    assert metrics["method"] == "lora" and "f1" in metrics["test"]


def test_target_modules_on_the_command_line(tiny_gpt2, ner_file, tmp_path):
    output_dir = tmp_path / "run"
    code = main(["train", "--model", tiny_gpt2, "--data", ner_file, "--output-dir", str(output_dir), "--shots", "16",
                 "--epochs", "1", "--batch-size", "8", "--max-length", "32", "--no-progress", "--target-modules",
                 "c_attn"])
    assert code == 0
    assert json.loads((output_dir / "adapter_config.json").read_text())["target_modules"] == ["c_attn"]


def test_unknown_target_modules_are_one_clear_line(tiny_gpt2, ner_file, tmp_path, capsys):
    code = main(["train", "--model", tiny_gpt2, "--data", ner_file, "--output-dir", str(tmp_path / "run"),
                 "--shots", "16", "--epochs", "1", "--no-progress", "--target-modules", "q_proj"])
    assert code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading progress bar
    assert "error" in last_line and "q_proj" in last_line and "Traceback" not in last_line
