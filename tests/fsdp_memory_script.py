"""Run by test_distributed.py under `torch.distributed.run --nproc_per_node 2` (CPU, gloo): torch-native FSDP2
(`fully_shard` on every block and on the whole model) around a UMEMA model, trained by a plain loop that commits
the memory after every optimizer step. accelerate cannot run FSDP on CPU (it silently falls back to DDP there), so
this is the FSDP check that runs without an accelerator.

    fsdp_memory_script.py OUTPUT_DIR fsdp     # FSDP2
    fsdp_memory_script.py OUTPUT_DIR ddp      # the same loop under DDP: the reference

Each rank writes OUTPUT_DIR/<mode>-rank<r>.safetensors: the bank after each step, the full trainable parameters at
the end, the first batch it saw, and the fraction of parameter elements it held between steps.
"""

import os
import sys

import torch
import torch.distributed as dist
from conftest import tiny_batch, tiny_model
from distributed_memory_script import BANK_BUFFERS, PER_DEVICE_BATCH, STEPS, local_numel
from peft import get_peft_model
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from peft_umema import UMEMAConfig


def main(output_dir: str, mode: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    base = tiny_model("gpt2", seed=0)
    torch.manual_seed(0)
    model = get_peft_model(base, UMEMAConfig(task_type="SEQ_CLS", r=4, memory_size=8))
    full_numel = local_numel(model)
    wrapped = model
    if mode == "fsdp":
        for block in model.base_model.model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    bank = model.base_model.umema_modules["default"].memory.bank
    tensors = {}
    model.train()
    for step in range(1, STEPS + 1):
        # the rows the Trainer's distributed sampler would give this rank: batches interleaved by rank
        batch = tiny_batch(seed=(step - 1) * world + rank, batch_size=PER_DEVICE_BATCH)
        if step == 1:
            tensors["first_batch"] = batch["input_ids"]
        wrapped(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.base_model.commit_memory()
        tensors.update({f"step{step}.{name}": getattr(bank, name).detach().clone() for name in BANK_BUFFERS})
    for name, p in model.named_parameters():
        if p.requires_grad:
            tensors[f"param.{name}"] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
    tensors["sharded_fraction"] = torch.tensor(1 - held / full_numel)
    save_file(tensors, os.path.join(output_dir, f"{mode}-rank{rank}.safetensors"))
    dist.barrier()  # no destroy_process_group(): with a DDP wrapper alive, gloo's teardown can hang on one rank


if __name__ == "__main__":
    main(*sys.argv[1:])
