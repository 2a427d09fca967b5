"""Peak memory and train-step time of QLoRA (4-bit NF4 backbone) against a full-precision backbone, for plain LoRA
and for UMEMA, on a random-weight Llama of a given shape (default: SmolLM2-135M's).

    python benchmarks/qlora.py                                  # SmolLM2-135M shape, 8 x 128 tokens, CUDA if any
    python benchmarks/qlora.py --device cpu --seq-len 32 --steps 3
    python benchmarks/qlora.py --hidden-size 2048 --intermediate-size 8192 --layers 16 --heads 32 --kv-heads 8

The random backbone is saved once to a temporary folder (weights do not change memory or time), then every variant
(fp LoRA, fp UMEMA, 4-bit LoRA, 4-bit UMEMA) runs in its own process, so that each peak is its own: on CUDA the
peak of `torch.cuda.max_memory_allocated`, on CPU the process's peak resident set size (which also counts the
Python runtime and libraries, the same for all variants). "weights" is the size of the model's parameters and
buffers. Step time: one optimizer step (forward, backward, AdamW, memory commit), median and minimum over
`--steps` steps after one warm-up step. The fp variants run in `--fp-dtype` (fp32 by default; bf16 is the usual
GPU baseline); the 4-bit ones compute in bf16 on GPUs that have it, fp32 on CPU (peft_umema's `load_backbone`).
Prints a Markdown table; `--json` also writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

VARIANTS = {
    "LoRA, fp": {"umema": False, "load_in_4bit": False},
    "UMEMA, fp": {"umema": True, "load_in_4bit": False},
    "LoRA, 4-bit (QLoRA)": {"umema": False, "load_in_4bit": True},
    "UMEMA, 4-bit (QLoRA)": {"umema": True, "load_in_4bit": True},
}


def save_random_llama(folder: str, args) -> None:
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.seq_len), tie_word_embeddings=True, pad_token_id=0,
    )
    torch.manual_seed(0)
    LlamaModel(config).save_pretrained(folder)


def run_variant(folder: str, name: str, args) -> dict:
    """In a fresh process: build one variant, time its train steps, report its peak memory."""
    import peft_umema
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from peft_umema.experiments.backbones import quantization_config
    from peft_umema.tuner.quantization import prepare_quantized_layers

    variant = VARIANTS[name]
    device = args.device
    if variant["load_in_4bit"]:
        from peft import prepare_model_for_kbit_training

        device_map = {"": torch.device(device).index or 0} if device.startswith("cuda") else "cpu"
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=args.num_labels, quantization_config=quantization_config(load_in_4bit=True),
            device_map=device_map,
        )
        prepare_quantized_layers(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.fp_dtype]
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=args.num_labels, dtype=dtype)
        model.to(device)
    model.config.pad_token_id = 0
    torch.manual_seed(0)
    common = {"task_type": "SEQ_CLS", "r": args.rank, "lora_alpha": 2 * args.rank, "lora_dropout": 0.0}
    config = peft_umema.UMEMAConfig(**common) if variant["umema"] else LoraConfig(**common)
    model = get_peft_model(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))

    generator = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1, args.vocab_size, (args.batch_size, args.seq_len), generator=generator),
        "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long),
        "labels": torch.randint(0, args.num_labels, (args.batch_size,), generator=generator),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    model.train()
    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()
        if variant["umema"]:
            model.base_model.commit_memory()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times = times[1:]  # the first step pays for lazy initialisation
    if device.startswith("cuda"):
        peak, peak_kind = torch.cuda.max_memory_allocated(), "CUDA max allocated"
    else:
        peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"
    return {
        "variant": name,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "weights_mb": weights / 2**20,
        "peak_mb": peak / 2**20,
        "peak_kind": peak_kind,
        "step_s_median": statistics.median(times),
        "step_s_min": min(times),
        "device": device,
    }


def table(rows: list[dict]) -> str:
    reference = rows[0]
    lines = [
        f"| variant | trainable params | weights (MB) | peak memory (MB, {rows[0]['peak_kind']}) | "
        "train step (s, median / min) | step x LoRA fp (median) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row['trainable_parameters']:,} | {row['weights_mb']:.0f} | {row['peak_mb']:.0f} | "
            f"{row['step_s_median']:.3f} / {row['step_s_min']:.3f} | "
            f"{row['step_s_median'] / reference['step_s_median']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=576)
    parser.add_argument("--intermediate-size", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, default=49152)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--num-labels", type=int, default=13)
    parser.add_argument("--steps", type=int, default=5, help="timed train steps per variant (after one warm-up)")
    parser.add_argument("--fp-dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="dtype of the full-precision variants")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one variant on --checkpoint, print JSON
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hidden_size % 64 or args.intermediate_size % 64:
        parser.error("bitsandbytes' CPU 4-bit kernels need hidden and intermediate sizes that are multiples of 64")

    if args.worker:
        print("RESULT " + json.dumps(run_variant(args.checkpoint, args.worker, args)), flush=True)
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as folder:
        save_random_llama(folder, args)
        shared = ("hidden_size", "intermediate_size", "layers", "heads", "kv_heads", "vocab_size", "batch_size",
                  "seq_len", "rank", "num_labels", "steps", "fp_dtype", "device")
        options = [item for key in shared for item in (f"--{key.replace('_', '-')}", str(getattr(args, key)))]
        for name in args.variants:
            command = [sys.executable, os.path.abspath(__file__), *options, "--worker", name, "--checkpoint", folder]
            result = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
            if result.returncode != 0 or not lines:
                sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
            rows.append(json.loads(lines[-1][len("RESULT "):]))
            print(f"{name}: done", file=sys.stderr, flush=True)
    shape = (f"Llama d={args.hidden_size}, ffn={args.intermediate_size}, {args.layers} layers, vocab={args.vocab_size}; "
             f"batch {args.batch_size} x {args.seq_len} tokens, LoRA r={args.rank}, device {args.device}, "
             f"fp variants in {args.fp_dtype}, torch {torch.__version__}")
    print(shape)
    print()
    print(table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"setup": shape, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
