"""UMEMATrainer and MemoryUpdateCallback with the real HF Trainer on tiny models."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_batch, tiny_model
from datasets import Dataset
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from peft_umema import UMEMAConfig
from peft_umema.training.callbacks import MemoryUpdateCallback
from peft_umema.training.trainer import UMEMATrainer

ROOT = Path(__file__).resolve().parents[1]


def dataset(task, batches=6, batch_size=4, seed=0):
    rows = []
    for b in range(batches):
        batch = tiny_batch(task=task, seed=seed + b, batch_size=batch_size)
        rows += [{k: v[i].tolist() for k, v in batch.items()} for i in range(batch_size)]
    return Dataset.from_list(rows)


def no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def make(task="SEQ_CLS", family="gpt2", seed=0, **config):
    torch.manual_seed(seed)
    config.setdefault("memory_size", 16)
    return get_peft_model(no_dropout(tiny_model(family, task)), UMEMAConfig(task_type=task, r=4, **config))


def args(tmp_path, **overrides):
    defaults = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=1, learning_rate=1e-2,
        report_to=[], logging_steps=1, use_cpu=True, save_strategy="no", seed=0, data_seed=0,
        disable_tqdm=True,
    )
    defaults.update(overrides)
    return TrainingArguments(**defaults)


def bank(model):
    return model.base_model.umema_modules["default"].memory.bank


class LogRecorder(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


@pytest.mark.parametrize("task", ["SEQ_CLS", "TOKEN_CLS"])
def test_umema_trainer_logs_both_loss_terms_and_memory(task, tmp_path):
    model = make(task)
    recorder = LogRecorder()
    trainer = UMEMATrainer(model=model, args=args(tmp_path), train_dataset=dataset(task), callbacks=[recorder])
    trainer.train()
    step_logs = [log for log in recorder.logs if "loss" in log]
    assert len(step_logs) == 6
    for log in step_logs:
        for key in ("task_loss", "confidence_loss", "memory_fill", "mean_confidence", "mean_temperature"):
            assert key in log, key
        weight = model.peft_config["default"].confidence_loss_weight
        assert log["loss"] == pytest.approx(log["task_loss"] + weight * log["confidence_loss"], abs=2e-3)
    assert step_logs[-1]["memory_fill"] == pytest.approx(6 / 16)
    assert int(bank(model).fill_count) == 6 and bank(model).pending_writes == 0


@pytest.mark.parametrize("task", ["SEQ_CLS", "TOKEN_CLS"])
def test_gradient_accumulation_matches_one_large_batch(task, tmp_path):
    data = dataset(task, batches=4)
    large, accumulated = make(task), make(task)
    # SGD: Adam's normalisation would amplify float-rounding differences of near-zero gradients
    UMEMATrainer(
        model=large, args=args(tmp_path / "a", per_device_train_batch_size=8, optim="sgd"), train_dataset=data
    ).train()
    UMEMATrainer(
        model=accumulated,
        args=args(tmp_path / "b", per_device_train_batch_size=4, gradient_accumulation_steps=2, optim="sgd"),
        train_dataset=data,
    ).train()
    for (name, p), (_, q) in zip(large.named_parameters(), accumulated.named_parameters()):
        if p.requires_grad:
            assert torch.allclose(p, q, atol=1e-5), name
    assert int(bank(large).fill_count) == int(bank(accumulated).fill_count) == 2
    assert torch.allclose(bank(large).keys, bank(accumulated).keys, atol=1e-5)


def test_plain_trainer_with_callback_commits_every_step(tmp_path):
    model = make("SEQ_CLS", family="bert")
    Trainer(
        model=model, args=args(tmp_path), train_dataset=dataset("SEQ_CLS"), callbacks=[MemoryUpdateCallback()]
    ).train()
    assert int(bank(model).fill_count) == 6 and int(bank(model).write_pointer) == 6


def test_umema_trainer_rejects_other_models(tmp_path):
    with pytest.raises(ValueError, match="UMEMAConfig"):
        UMEMATrainer(model=tiny_model("gpt2"), args=args(tmp_path), train_dataset=dataset("SEQ_CLS"))


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("task", ["SEQ_CLS", "TOKEN_CLS"])
def test_resume_after_interruption_restores_bank_exactly(task, tmp_path):
    data = dataset(task, batches=6)
    common = dict(num_train_epochs=2, save_strategy="steps", save_steps=4)
    straight = make(task, family="llama")
    UMEMATrainer(model=straight, args=args(tmp_path / "straight", **common), train_dataset=data).train()

    interrupted = make(task, family="llama")
    UMEMATrainer(
        model=interrupted, args=args(tmp_path / "resumed", **common), train_dataset=data, callbacks=[StopAt(4)]
    ).train()
    assert int(bank(interrupted).fill_count) == 4
    resumed = make(task, family="llama", seed=123)  # a fresh process would start from other random weights
    UMEMATrainer(model=resumed, args=args(tmp_path / "resumed", **common), train_dataset=data).train(
        resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-4")
    )
    for name in ("keys", "values", "write_pointer", "fill_count"):
        assert torch.equal(getattr(bank(straight), name), getattr(bank(resumed), name)), name
    assert int(bank(resumed).fill_count) == 12
    for (name, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        if p.requires_grad:
            assert torch.equal(p, q), name


def test_load_best_model_at_end_restores_that_checkpoints_bank(tmp_path):
    data = dataset("SEQ_CLS", batches=4)
    model = make("SEQ_CLS", family="bert")
    trainer = UMEMATrainer(
        model=model,
        args=args(
            tmp_path, num_train_epochs=3, eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
            metric_for_best_model="loss", greater_is_better=False, per_device_eval_batch_size=4,
        ),
        train_dataset=data,
        eval_dataset=data,
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    saved = load_file(os.path.join(best, "adapter_model.safetensors"))
    key = next(k for k in saved if k.endswith("bank.keys"))
    assert torch.equal(saved[key], bank(model).keys)
    assert int(saved[key.replace("keys", "fill_count")]) == int(bank(model).fill_count)


def test_callback_starts_fresh_bank_on_task_change(tmp_path):
    model = make("SEQ_CLS", num_tasks=2)
    callback = MemoryUpdateCallback(task_id=0)
    UMEMATrainer(model=model, args=args(tmp_path), train_dataset=dataset("SEQ_CLS"), callbacks=[callback]).train()
    assert int(bank(model).fill_count) == 6
    callback.set_task(1)
    UMEMATrainer(
        model=model, args=args(tmp_path), train_dataset=dataset("SEQ_CLS", batches=2), callbacks=[callback]
    ).train()
    assert int(bank(model).fill_count) == 2 and int(model.base_model.umema_modules["default"].task_id) == 1


def test_data_parallel_ranks_hold_identical_banks(tmp_path):
    """Two CPU processes (gloo) under `accelerate launch`: after every step both ranks hold the same bank."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
        "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "tests" / "ddp_memory_script.py"), str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = sorted(tmp_path.glob("rank*.safetensors"))
    assert len(reports) == 2
    rank0, rank1 = (load_file(p) for p in reports)
    assert rank0.keys() == rank1.keys() and sum(k.endswith(".keys") for k in rank0) == 4
    for name in rank0:
        if name != "first_batch":
            assert torch.equal(rank0[name], rank1[name]), name
    assert int(rank0["step3.fill_count"]) == 4
    # ranks saw different data, yet wrote the same averaged slot
    assert not torch.equal(rank0["first_batch"], rank1["first_batch"])
