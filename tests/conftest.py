"""Shared test fixtures: tiny random transformers models of the three families we support."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may wait on an unreachable hub
os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses too: tiny models only pay thread overhead

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    GPT2Config,
    LlamaConfig,
)

torch.set_num_threads(1)  # tiny models gain nothing from threads, and 2 threads per process oversubscribe 2 cores
SHARED_DATA = Path(os.environ.get("PEFT_UMEMA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
FAMILIES = ("gpt2", "llama", "bert")
TASKS = ("SEQ_CLS", "TOKEN_CLS")
VOCAB = 96
HIDDEN = 32


def tiny_config(family: str, num_labels: int = 3):
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=3, n_head=2, n_positions=64, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)
    elif family == "llama":
        cfg = LlamaConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0,
        )
    elif family == "bert":
        cfg = BertConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
        )
    else:
        raise ValueError(family)
    cfg.num_labels = num_labels
    return cfg


def tiny_model(family: str, task: str = "SEQ_CLS", num_labels: int = 3, seed: int = 0):
    """A freshly initialised tiny model; same seed -> same weights."""
    torch.manual_seed(seed)
    auto = AutoModelForSequenceClassification if task == "SEQ_CLS" else AutoModelForTokenClassification
    return auto.from_config(tiny_config(family, num_labels))


def tiny_batch(batch_size: int = 4, seq_len: int = 10, num_labels: int = 3, task: str = "SEQ_CLS", seed: int = 0):
    """Right-padded random batch with labels (-100 on padding for token tasks)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (batch_size, seq_len), generator=g)
    attention_mask = torch.ones_like(input_ids)
    for b in range(1, batch_size):
        pad = min(b * 2, seq_len - 2)
        input_ids[b, seq_len - pad :] = 0
        attention_mask[b, seq_len - pad :] = 0
    if task == "SEQ_CLS":
        labels = torch.randint(0, num_labels, (batch_size,), generator=g)
    else:
        labels = torch.randint(0, num_labels, (batch_size, seq_len), generator=g)
        labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        raise FileNotFoundError(f"../shared/data not found at {SHARED_DATA}; set PEFT_UMEMA_SHARED_DATA")
    return SHARED_DATA
