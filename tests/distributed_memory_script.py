"""Run by test_distributed.py under `accelerate launch --config_file accelerate_configs/<ddp|zero2|zero3>.yaml`
(2 CPU processes, gloo): trains a tiny UMEMA model with UMEMATrainer, records every rank's memory bank after every step,
checkpoints, and (second launch) resumes from a checkpoint.

    distributed_memory_script.py OUTPUT_DIR straight          # 6 steps, checkpoints at steps 3 and 6
    distributed_memory_script.py OUTPUT_DIR resume CHECKPOINT # a fresh model resumed from CHECKPOINT to step 6

Each rank writes OUTPUT_DIR/<mode>-rank<r>.safetensors: the bank after each step (`step<k>.<buffer>`), the
trainable parameters at the end (gathered), and the first batch it saw.
"""

import os
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

BANK_BUFFERS = ("keys", "values", "write_pointer", "fill_count")


def use_gloo_for_deepspeed_on_cpu() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel when its communication starts; it needs
    a C++ compiler (a fresh CI machine has none) and, on a loaded machine, aborted once at shutdown ("terminate
    called without an active exception"). Mark it unavailable everywhere: DeepSpeed then runs its collectives through
    torch.distributed's gloo, as on every non-Linux CPU. ZeRO's partitioning, gathering and checkpointing, what these
    tests check, are the same either way; on GPUs the kernel is never used."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") != "true":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


STEPS, SAVE_STEPS, PER_DEVICE_BATCH, WORLD = 6, 3, 2, 2


class RecordBank(TrainerCallback):
    """After MemoryUpdateCallback (registered first) has committed the step's write: a copy of the bank."""

    def __init__(self):
        self.steps = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        bank = find_umema_tuner(model).umema_modules["default"].memory.bank
        self.steps[state.global_step] = {name: getattr(bank, name).detach().clone() for name in BANK_BUFFERS}


class RecordingTrainer(UMEMATrainer):
    first_batch = None

    def create_accelerator_and_postprocess(self):
        # accelerate on CPU defaults to its own backend choice; DeepSpeed would then see 2 processes and accelerate 1
        super().create_accelerator_and_postprocess()
        assert self.accelerator.num_processes == WORLD, self.accelerator.num_processes

    def compute_loss(self, model, inputs, *args, **kwargs):
        if self.first_batch is None:
            self.first_batch = inputs["input_ids"].detach().clone()
        return super().compute_loss(model, inputs, *args, **kwargs)


def training_rows() -> Dataset:
    rows = []
    for b in range(STEPS * WORLD):
        batch = tiny_batch(seed=b, batch_size=PER_DEVICE_BATCH)
        rows += [{k: v[i].tolist() for k, v in batch.items()} for i in range(PER_DEVICE_BATCH)]
    return Dataset.from_list(rows)


def local_numel(model) -> int:
    """Parameter elements this rank holds between steps: all of them under DDP and ZeRO-2, none under ZeRO-3
    (a partitioned parameter's data is empty outside the forward pass of its module)."""
    return sum(p.numel() for p in model.parameters())


def save_with_pending_write_on_rank0(trainer, output_dir: str) -> None:
    """A custom-loop pattern: a training forward queues a write, then only rank 0 saves. Saving must not wait for
    the other ranks (no collective inside save_pretrained) and must hold the committed bank; then every rank
    commits the pending write together."""
    import torch.distributed as dist

    model, tuner = trainer.model, find_umema_tuner(trainer.model)
    batch = {k: v.to(trainer.args.device) for k, v in tiny_batch(seed=999, batch_size=PER_DEVICE_BATCH).items()}
    model.train()
    model(**batch)
    assert tuner.memory_stats()["memory_pending_writes"] == 1
    if trainer.args.process_index == 0:
        model.save_pretrained(os.path.join(output_dir, "pending-save"))
    dist.barrier()
    assert tuner.commit_memory() == 1


def gathered_trainable(trainer) -> dict:
    """Trainable parameters in full on every rank (ZeRO-3 partitions them)."""
    model = trainer.model
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        params = [p for _, p in model.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params):
            return {name: p.detach().clone() for name, p in zip(names, params)}
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def main(output_dir: str, mode: str, checkpoint: str = None) -> None:
    use_gloo_for_deepspeed_on_cpu()
    base = tiny_model("gpt2", seed=0)  # the same pretrained backbone in every run
    torch.manual_seed(0 if mode == "straight" else 123)  # a resumed process starts from other adapter weights
    model = get_peft_model(base, UMEMAConfig(task_type="SEQ_CLS", r=4, memory_size=8))
    full_numel = local_numel(model)
    args = TrainingArguments(
        output_dir=os.path.join(output_dir, "checkpoints"), per_device_train_batch_size=PER_DEVICE_BATCH,
        max_steps=STEPS, learning_rate=1e-2, report_to=[], save_strategy="steps", save_steps=SAVE_STEPS,
        use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, ddp_backend="gloo", logging_steps=1,
    )
    recorder = RecordBank()
    trainer = RecordingTrainer(model=model, args=args, train_dataset=training_rows(), callbacks=[recorder])
    trainer.train(resume_from_checkpoint=checkpoint)
    rank = trainer.args.process_index
    tensors = {f"step{k}.{name}": t for k, step in recorder.steps.items() for name, t in step.items()}
    tensors.update({f"param.{name}": t for name, t in gathered_trainable(trainer).items()})
    tensors["first_batch"] = trainer.first_batch
    # the novelty references set when training ended: the ranks' samples merged (row order aside)
    bank = find_umema_tuner(trainer.model).umema_modules["default"].memory.bank
    references = bank.references[: int(bank.reference_count)]
    tensors["final.references"] = references[references[:, 0].argsort()].contiguous()
    tensors["final.reference_count"] = bank.reference_count.clone()
    tensors["dataset_size"] = torch.tensor(len(training_rows()))
    tensors["sharded_fraction"] = torch.tensor(1 - local_numel(trainer.model_wrapped) / full_numel)
    if mode == "straight" and float(tensors["sharded_fraction"]) == 0:  # full parameters: a plain forward works
        save_with_pending_write_on_rank0(trainer, output_dir)
    save_file(tensors, os.path.join(output_dir, f"{mode}-rank{rank}.safetensors"))
    # leave together: a rank that exits while the other still talks to it tears gloo down under it (seen once as
    # "terminate called without an active exception" on a loaded machine)
    torch.distributed.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
