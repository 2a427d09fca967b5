"""Train-step and inference time of UMEMA relative to plain LoRA, measured side by side in one run.

    python benchmarks/overhead.py                     # SmolLM2-135M, SEQ_CLS, 8 x 128 tokens
    python benchmarks/overhead.py --model minilm --task TOKEN_CLS
    python benchmarks/overhead.py --model minilm --bank-sizes 65536 --top-k 32   # + large banks, dense and top-k

Every variant (LoRA, +UM, +EMA, full UMEMA) gets its own copy of the same backbone and the same batch; the
timings interleave the variants round by round (rotating who goes first), so machine noise hits all of them
alike. Ratios are given on medians and on minima (the minimum is the run least disturbed by other processes, the
better estimate on a shared machine). Prints a Markdown table of times, ratios to LoRA (and, with --bank-sizes,
to full UMEMA with the paper's 256-slot bank) and trainable parameters.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from tqdm import tqdm

import peft_umema
from peft_umema.experiments.backbones import load_backbone

VARIANTS = {
    "LoRA": None,
    "+UM": {"use_um": True, "use_ema": False},
    "+EMA": {"use_um": False, "use_ema": True},
    "UMEMA (full)": {"use_um": True, "use_ema": True},
}


def build(variant_options, args, num_labels):
    model, _ = load_backbone(args.model, args.task, num_labels=num_labels)
    torch.manual_seed(0)
    common = {"task_type": args.task, "r": args.rank, "lora_alpha": 2 * args.rank}
    config = LoraConfig(**common) if variant_options is None else peft_umema.UMEMAConfig(**common, **variant_options)
    model = get_peft_model(model, config).to(args.device)
    if isinstance(model.base_model, peft_umema.UMEMAModel):  # a full bank, as after J training steps
        for modules in model.base_model.umema_modules.values():
            if modules.memory is not None:
                modules.memory.bank.fill_count.fill_(modules.memory.bank.memory_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step(model, optimizer, batch, device):
    model.train()
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    optimizer.step()
    if isinstance(model.base_model, peft_umema.UMEMAModel):
        model.base_model.commit_memory()
    synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def inference_step(model, batch, device):
    model.eval()
    start = time.perf_counter()
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    synchronize(device)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="backbone name or path (see peft_umema.experiments.backbones)")
    parser.add_argument("--task", default="SEQ_CLS", choices=["SEQ_CLS", "TOKEN_CLS"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--num-labels", type=int, default=13)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per variant (after one warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bank-sizes", type=int, nargs="*", default=[],
                        help="also time full UMEMA with these memory sizes (the paper's is 256)")
    parser.add_argument("--top-k", type=int, help="with --bank-sizes: also time top-k retrieval from those banks")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()

    variants = dict(VARIANTS)
    for size in args.bank_sizes:
        variants[f"UMEMA J={size}"] = {"use_um": True, "use_ema": True, "memory_size": size}
        if args.top_k:
            variants[f"UMEMA J={size} top-{args.top_k}"] = {**variants[f"UMEMA J={size}"],
                                                           "retrieval_top_k": args.top_k}
    models = {name: build(options, args, args.num_labels) for name, options in variants.items()}
    vocab = models["LoRA"][0].get_base_model().config.vocab_size
    generator = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(3, vocab, (args.batch_size, args.seq_len), generator=generator),
        "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long),
    }
    label_shape = (args.batch_size,) if args.task == "SEQ_CLS" else (args.batch_size, args.seq_len)
    batch["labels"] = torch.randint(0, args.num_labels, label_shape, generator=generator)
    batch = {k: v.to(args.device) for k, v in batch.items()}

    names = list(models)
    train_times = {name: [] for name in names}
    infer_times = {name: [] for name in names}
    for round_index in tqdm(range(args.repeats + 1), desc="rounds (first is warm-up)"):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            model, optimizer = models[name]
            train_seconds = train_step(model, optimizer, batch, args.device)
            infer_seconds = inference_step(model, batch, args.device)
            if round_index > 0:
                train_times[name].append(train_seconds)
                infer_times[name].append(infer_seconds)

    base_model_params = sum(p.numel() for p in models["LoRA"][0].get_base_model().parameters())
    results = []
    for name in names:
        trainable, _ = models[name][0].get_nb_trainable_parameters()
        result = {"variant": name, "trainable_params": trainable}
        for label, times in (("train", train_times), ("inference", infer_times)):
            for statistic in (statistics.median, min):
                key = f"{label}_{statistic.__name__}"
                result[f"{key}_s"] = statistic(times[name])
                result[f"{key}_ratio"] = statistic(times[name]) / statistic(times["LoRA"])
                result[f"{key}_vs_umema"] = statistic(times[name]) / statistic(times["UMEMA (full)"])
        results.append(result)

    print(f"\nbackbone={args.model} task={args.task} batch={args.batch_size}x{args.seq_len} rank={args.rank} "
          f"device={args.device} threads={torch.get_num_threads()} repeats={args.repeats} "
          f"base params={base_model_params:,}")
    print("| variant | trainable params | train step median (s) | x LoRA | min x LoRA | x UMEMA J=256 (median / min) "
          "| inference median (s) | x LoRA | min x LoRA | x UMEMA J=256 (median / min) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['variant']} | {r['trainable_params']:,} | {r['train_median_s']:.3f} | "
              f"{r['train_median_ratio']:.3f} | {r['train_min_ratio']:.3f} | "
              f"{r['train_median_vs_umema']:.3f} / {r['train_min_vs_umema']:.3f} | {r['inference_median_s']:.3f} | "
              f"{r['inference_median_ratio']:.3f} | {r['inference_min_ratio']:.3f} | "
              f"{r['inference_median_vs_umema']:.3f} / {r['inference_min_vs_umema']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
