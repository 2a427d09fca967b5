"""Run by test_training.py under `accelerate launch --num_processes 2 --cpu`: records each rank's bank per step."""

import sys

import torch
from conftest import tiny_batch, tiny_model
from datasets import Dataset
from peft import get_peft_model
from safetensors.torch import save_file
from transformers import TrainerCallback, TrainingArguments

from peft_umema import UMEMAConfig
from peft_umema.training.callbacks import find_umema_tuner
from peft_umema.training.trainer import UMEMATrainer


class RecordBank(TrainerCallback):
    def __init__(self):
        self.steps = []
        self.first_batch = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # registered after MemoryUpdateCallback, so the step's write is committed
        bank = find_umema_tuner(model).umema_modules["default"].memory.bank
        self.steps.append({n: getattr(bank, n).clone() for n in ("keys", "values", "write_pointer", "fill_count")})


class RecordingTrainer(UMEMATrainer):
    def compute_loss(self, model, inputs, *args, **kwargs):
        if self.recorder.first_batch is None:
            self.recorder.first_batch = inputs["input_ids"].clone()
        return super().compute_loss(model, inputs, *args, **kwargs)


def main(output_dir):
    rows = []
    for b in range(4):
        batch = tiny_batch(seed=b, batch_size=4)
        rows += [{k: v[i].tolist() for k, v in batch.items()} for i in range(4)]
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("gpt2"), UMEMAConfig(task_type="SEQ_CLS", r=4, memory_size=8))
    args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=2, num_train_epochs=1, report_to=[], save_strategy="no",
        use_cpu=True, seed=0, disable_tqdm=True, ddp_backend="gloo",
    )
    recorder = RecordBank()
    trainer = RecordingTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), callbacks=[recorder])
    trainer.recorder = recorder
    trainer.train()
    rank = trainer.args.process_index
    tensors = {f"step{i}.{name}": t for i, step in enumerate(recorder.steps) for name, t in step.items()}
    save_file({**tensors, "first_batch": recorder.first_batch}, f"{output_dir}/rank{rank}.safetensors")
    # both ranks leave together: a rank exiting while gloo still talks to the other aborted it ("terminate called
    # without an active exception") on a loaded machine
    torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
