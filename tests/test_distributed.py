"""The memory bank under sharded data parallelism on two CPU processes (gloo).

DeepSpeed ZeRO-2 and ZeRO-3 run through the HF Trainer under `accelerate launch --config_file
tests/accelerate_configs/<zero2|zero3>.yaml`: both ranks hold the same bank after every optimizer step (while seeing
different data), the checkpoints hold exactly the bank of their step, a fresh process resumed from a checkpoint
continues to the same banks and the same weights bit for bit, the parameters really are partitioned (ZeRO-3), and
the run computes what the same Trainer run under DDP computes (so the memory-key projection and the retrieval ran
on gathered parameters). The DDP run also saves on rank 0 alone with a write pending: no collective runs inside
save_pretrained, so nothing waits for the other rank.

FSDP: accelerate (1.15) enables FSDP only on accelerators and silently runs DDP on CPU, so FSDP is checked with
torch's own FSDP2 (`fully_shard`) under `torch.distributed.run` and a plain training loop, against the same loop
under DDP (tests/fsdp_memory_script.py). Trainer checkpoints under FSDP need a GPU and are not covered here.

Each backend takes one or two launches of ~30-60 s on 2 CPU cores: marked `distributed` (run by default; deselect
with `-m "not distributed"` for a quick loop).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "accelerate_configs"
SCRIPT = ROOT / "tests" / "distributed_memory_script.py"
STEPS, SAVE_STEPS = 6, 3
BANK_BUFFERS = ("keys", "values", "write_pointer", "fill_count")
# Sharded and replicated runs sum gradients in other orders; Adam turns float32 rounding into ~1e-4 differences
# after 6 steps on this model. A wrong parameter (an empty shard, a stale copy) differs by 1e-2 and more.
REFERENCE_TOLERANCE = 2e-3
# ... except UM's token-importance bias: a bias before a softmax has no gradient, so Adam, which normalises the
# gradient, moves it by +-lr per step in the direction of float32 rounding noise, differently in every run layout.
NO_GRADIENT = ("uncertainty.importance_head.bias",)


def assert_matches_reference(report: dict, reference: dict) -> None:
    assert report.keys() == reference.keys()
    for name, expected in reference.items():
        if name not in ("first_batch", "sharded_fraction") and not name.endswith(NO_GRADIENT):
            torch.testing.assert_close(report[name], expected, rtol=0, atol=REFERENCE_TOLERANCE, msg=name)

pytestmark = pytest.mark.distributed


def launch(backend: str, output_dir: Path, *script_args: str, script: Path = SCRIPT) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
    }
    if backend == "torchrun":
        launcher = ["torch.distributed.run", "--nproc_per_node", "2"]
    else:
        launcher = ["accelerate.commands.launch", "--config_file", str(CONFIGS / f"{backend}.yaml")]
    command = [sys.executable, "-m", *launcher, str(script), str(output_dir), *script_args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]


def reports(output_dir: Path, mode: str) -> tuple[dict, dict]:
    files = [output_dir / f"{mode}-rank{rank}.safetensors" for rank in (0, 1)]
    assert all(f.is_file() for f in files), list(output_dir.iterdir())
    return tuple(load_file(f) for f in files)


def saved_bank(adapter_dir: Path) -> dict:
    state = load_file(adapter_dir / "adapter_model.safetensors")
    return {name: next(v for k, v in state.items() if k.endswith(f"bank.{name}")) for name in BANK_BUFFERS}


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory) -> dict:
    output_dir = tmp_path_factory.mktemp("ddp")
    launch("ddp", output_dir, "straight")
    rank0, rank1 = reports(output_dir, "straight")
    for name in rank0:
        if name != "first_batch":
            assert torch.equal(rank0[name], rank1[name]), name
    assert float(rank0["sharded_fraction"]) == 0
    # every rank saw half the data when training ended; both hold all of it as novelty references
    assert int(rank0["final.reference_count"]) == int(rank0["dataset_size"])
    # rank 0 saved alone while a write was pending: the file holds the bank as committed at the last step
    pending = saved_bank(output_dir / "pending-save")
    for name in BANK_BUFFERS:
        assert torch.equal(pending[name], rank0[f"step{STEPS}.{name}"]), name
    return rank0


@pytest.mark.parametrize("backend", ["zero2", "zero3"])
def test_sharded_training_keeps_ranks_banks_identical_and_resumes_exactly(backend, ddp_reference, tmp_path):
    launch(backend, tmp_path, "straight")
    rank0, rank1 = reports(tmp_path, "straight")

    # every rank, every step: the same bank, one slot per step, although the ranks saw different batches
    assert rank0.keys() == rank1.keys()
    assert sorted(int(k[4:].split(".")[0]) for k in rank0 if k.endswith(".fill_count")) == list(range(1, STEPS + 1))
    for name in rank0:
        if name != "first_batch":
            assert torch.equal(rank0[name], rank1[name]), name
    assert not torch.equal(rank0["first_batch"], rank1["first_batch"])
    for step in range(1, STEPS + 1):
        assert int(rank0[f"step{step}.fill_count"]) == step and int(rank0[f"step{step}.write_pointer"]) == step % 8
    # ZeRO-3 keeps no parameter whole between steps; ZeRO-2 partitions gradients and optimizer state only
    sharded = float(rank0["sharded_fraction"])
    assert sharded > 0.9 if backend == "zero3" else sharded == 0, sharded

    assert_matches_reference(rank0, ddp_reference)

    # checkpoints hold their step's bank exactly
    for step in (SAVE_STEPS, STEPS):
        bank = saved_bank(tmp_path / "checkpoints" / f"checkpoint-{step}")
        for name in BANK_BUFFERS:
            assert torch.equal(bank[name], rank0[f"step{step}.{name}"]), (step, name)

    # a fresh process (other initial adapter weights) resumed from step 3 reaches the same banks and weights
    launch(backend, tmp_path, "resume", str(tmp_path / "checkpoints" / f"checkpoint-{SAVE_STEPS}"))
    resumed0, resumed1 = reports(tmp_path, "resume")
    assert sorted(k for k in resumed0 if k.startswith("step")) == sorted(
        k for k in rank0 if k.startswith("step") and int(k[4:].split(".")[0]) > SAVE_STEPS
    )
    for name, value in resumed0.items():
        if name != "first_batch":
            assert torch.equal(value, resumed1[name]), name
            assert torch.equal(value, rank0[name]), name


def test_fsdp2_keeps_ranks_banks_identical_and_matches_ddp(tmp_path):
    script = ROOT / "tests" / "fsdp_memory_script.py"
    launch("torchrun", tmp_path, "fsdp", script=script)
    launch("torchrun", tmp_path, "ddp", script=script)
    rank0, rank1 = reports(tmp_path, "fsdp")
    for name in rank0:
        if name not in ("first_batch", "sharded_fraction"):
            assert torch.equal(rank0[name], rank1[name]), name
    assert not torch.equal(rank0["first_batch"], rank1["first_batch"])
    assert [int(rank0[f"step{step}.fill_count"]) for step in range(1, STEPS + 1)] == list(range(1, STEPS + 1))
    for rank in (rank0, rank1):  # each rank holds about half of every sharded parameter between steps
        assert 0.4 < float(rank["sharded_fraction"]) < 0.6
    reference, _ = reports(tmp_path, "ddp")
    assert float(reference["sharded_fraction"]) == 0
    assert_matches_reference(rank0, reference)
