"""Which novelty form separates out-of-distribution text best: the table of docs/method.md, section 2.

Takes a UMEMA run trained on SemEval-2010 (a `benchmarks/calibration_study.py` or `peft-umema train` folder),
captures the context summaries c and retrieval queries q of its k-shot training subset, of SemEval test sentences
and of 20 Newsgroups bodies cut to SemEval's length (`benchmarks/ood_check.py` draws the same ones), and prints the
OOD AUROC of each candidate score against each reference space.

    python benchmarks/novelty_forms.py runs/calibration-study/semeval2010_task8/umema_seed0 --examples 600
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from ood_check import IN_DISTRIBUTION, _auroc, _inputs

from peft_umema.data.loaders import load_data
from peft_umema.data.preprocessing import k_shot_subset, tokenize_dataset
from peft_umema.experiments import runs
from peft_umema.experiments.methods import dev_batches

SHRINKAGE = 0.1
PRINCIPAL_DIRECTIONS = 32
NEIGHBOURS = 10


def _standardised_squares(reference: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    mean, variance = reference.mean(0), reference.var(0).clamp_min(1e-6)
    return ((rows - mean) ** 2 / variance).mean(-1)


def _shrunk_precision(centred: torch.Tensor) -> torch.Tensor:
    covariance = centred.T @ centred / len(centred)
    identity = torch.eye(len(covariance), dtype=covariance.dtype)
    return torch.linalg.inv((1 - SHRINKAGE) * covariance + SHRINKAGE * covariance.diagonal().mean() * identity)


def typicality(reference, labels, rows):
    return _standardised_squares(reference, rows).log().abs()


def one_sided(reference, labels, rows):
    return _standardised_squares(reference, rows)


def mahalanobis(reference, labels, rows):
    mean = reference.mean(0)
    offset = rows - mean
    return ((offset @ _shrunk_precision(reference - mean)) * offset).sum(-1)


def class_mahalanobis(reference, labels, rows):
    classes = labels.unique()
    means = torch.stack([reference[labels == label].mean(0) for label in classes])
    precision = _shrunk_precision(reference - means[torch.searchsorted(classes, labels)])
    offsets = rows[:, None, :] - means[None]
    return torch.einsum("bkd,de,bke->bk", offsets, precision, offsets).amin(-1)


def principal_residual(reference, labels, rows):
    mean = reference.mean(0)
    directions = torch.linalg.svd(reference - mean, full_matrices=False)[2][:PRINCIPAL_DIRECTIONS].T
    offset = rows - mean
    return (offset - offset @ directions @ directions.T).pow(2).sum(-1)


def nearest_neighbour(reference, labels, rows, k=NEIGHBOURS):
    """1 - the cosine similarity to the k-th nearest reference (k = 1 is what the bank computes)."""
    similarity = F.normalize(rows, dim=-1) @ F.normalize(reference, dim=-1).T
    return 1 - similarity.topk(k, dim=-1).values[:, -1]


FORMS = {
    "typicality abs(log mean z^2)": typicality,
    "one-sided mean z^2": one_sided,
    f"Mahalanobis (shrinkage {SHRINKAGE})": mahalanobis,
    "class-conditional Mahalanobis": class_mahalanobis,
    f"residual outside top-{PRINCIPAL_DIRECTIONS} directions": principal_residual,
    f"1 - cosine to {NEIGHBOURS}th nearest": nearest_neighbour,
}


def capture(run, dataset, schema) -> dict[str, torch.Tensor]:
    """Summaries c, queries q and labels of `dataset` under the run's model in eval mode."""
    model = run.fitted.model
    memory = model.base_model.umema_modules[model.active_adapter].memory
    captured = []
    hook = memory.query_proj.register_forward_hook(lambda module, inputs, output: captured.append(
        (inputs[0][:, : memory.bank.dim].double(), output.double())))
    labels = []
    model.eval()
    try:
        tokenized = tokenize_dataset(dataset, run.tokenizer, run.info["max_length"], schema=schema)
        with torch.no_grad():
            for batch in dev_batches(tokenized, run.task_type, run.tokenizer, 32):
                labels.append(batch.pop("labels"))
                model(**batch)
    finally:
        hook.remove()
    return {"summary c": torch.cat([c for c, _ in captured]), "query q": torch.cat([q for _, q in captured]),
            "labels": torch.cat(labels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a UMEMA run folder trained on SemEval-2010")
    parser.add_argument("--examples", type=int, default=600)
    args = parser.parse_args()
    run = runs.load_run(args.run)
    splits, schema = load_data(IN_DISTRIBUTION)
    metrics = json.loads((args.run / runs.METRICS_NAME).read_text())
    train = k_shot_subset(splits["train"], metrics["shots"], metrics["seed"], schema=schema)
    inside, outside, _ = _inputs(args.examples, seed=0)
    reference, familiar, novel = (capture(run, dataset, schema) for dataset in (train, inside, outside))
    print(f"OOD AUROC ({args.examples} SemEval test sentences vs {args.examples} 20 Newsgroups bodies), references: "
          f"the {len(reference['labels'])} training examples")
    print("| score | on the summary c | on the query q |")
    print("|---|---:|---:|")
    for name, form in FORMS.items():
        cells = [_auroc(form(reference[space], reference["labels"], familiar[space]).numpy(),
                        form(reference[space], reference["labels"], novel[space]).numpy())
                 for space in ("summary c", "query q")]
        print(f"| {name} | {cells[0]:.3f} | {cells[1]:.3f} |")
    generator = torch.Generator().manual_seed(0)
    for count in (128, 256, 512, 1000):
        sample = reference["summary c"][torch.randperm(len(reference["labels"]), generator=generator)[:count]]
        score = _auroc(nearest_neighbour(sample, None, familiar["summary c"], k=1).numpy(),
                       nearest_neighbour(sample, None, novel["summary c"], k=1).numpy())
        print(f"nearest neighbour on c, {count} references: {score:.3f}")
    shuffler = random.Random(0)
    shuffled = capture(run, inside.map(lambda row: {"text": " ".join(
        shuffler.sample(row["text"].split(), len(row["text"].split())))}), schema)
    for name, form in (("typicality", typicality), ("nearest neighbour", nearest_neighbour)):
        score = _auroc(form(reference["summary c"], None, familiar["summary c"]).numpy(),
                       form(reference["summary c"], None, shuffled["summary c"]).numpy())
        print(f"SemEval test sentences vs their word-shuffled versions, {name} on c: {score:.3f}")


if __name__ == "__main__":
    main()
