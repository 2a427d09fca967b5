"""Out-of-distribution detection: runs trained on SemEval-2010 score SemEval test sentences (in distribution) and
20 Newsgroups message bodies cut to SemEval's length (out of distribution); AUROC of each method's uncertainty for
"this input is OOD": UMEMA's epistemic term and its confidence, LoRA's softmax response, MC dropout (10 passes) and
an ensemble of the LoRA runs of several seeds (predictive entropy and mutual information).

    python benchmarks/ood_check.py --study-dir runs/calibration-study --examples 1000
    python benchmarks/ood_check.py --umema-runs docs/results/runs/cells/minilm/semeval2010_task8/umema/*/run \
        --lora-runs docs/results/runs/cells/minilm/semeval2010_task8/lora/*lr0.002*/run

Reads the run folders `benchmarks/calibration_study.py` wrote (`semeval2010_task8/{umema,lora}_seed*`), or any
SemEval-trained run folders given explicitly (e.g. `peft-umema reproduce` cells kept with `--keep-adapters`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from calibration_study import refresh_novelty_references
from datasets import Dataset
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from sklearn.metrics import roc_auc_score

from peft_umema.baselines.mc_dropout import MCDropout
from peft_umema.data.loaders import load_data
from peft_umema.data.preprocessing import tokenize_dataset
from peft_umema.experiments import runs
from peft_umema.experiments.methods import dev_batches

IN_DISTRIBUTION = "semeval2010_task8"
OUT_OF_DISTRIBUTION = "20newsgroups"
WORDS = 20  # about a SemEval sentence, so that length alone does not give OOD text away


def _inputs(examples: int, seed: int) -> tuple[Dataset, Dataset, object]:
    in_splits, schema = load_data(IN_DISTRIBUTION)
    rng = np.random.default_rng(seed)
    inside = in_splits["test"].select(sorted(rng.choice(len(in_splits["test"]), examples, replace=False)))
    news = load_data(OUT_OF_DISTRIBUTION)[0]["test"]
    bodies = []
    for index in rng.permutation(len(news)):
        words = news[int(index)]["text"].split("\n\n", 1)[-1].split()
        if len(words) > WORDS:
            bodies.append(" ".join(words[:WORDS]))
        if len(bodies) == examples:
            break
    outside = Dataset.from_dict({"text": bodies, "label": [0] * len(bodies)}).cast(inside.features)
    return inside, outside, schema


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


def _auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    return float(roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(outside))], np.r_[inside, outside]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study-dir", default="runs/calibration-study")
    parser.add_argument("--umema-runs", nargs="+", type=Path, default=None, help="UMEMA run folders (default: "
                        "the study dir's umema_seed*)")
    parser.add_argument("--lora-runs", nargs="+", type=Path, default=None, help="LoRA run folders (default: the "
                        "study dir's lora_seed*)")
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--mc-samples", type=int, default=10)
    parser.add_argument("--output", default=None, help="JSON file for the AUROCs")
    args = parser.parse_args()
    root = Path(args.study_dir) / IN_DISTRIBUTION
    inside, outside, schema = _inputs(args.examples, seed=0)
    results: dict[str, list[float]] = {}

    def batches(run, dataset):
        tokenized = tokenize_dataset(dataset, run.tokenizer, run.info["max_length"], schema=schema)
        return dev_batches(tokenized, run.task_type, run.tokenizer, 32)

    def add(name, scores_in, scores_out):
        results.setdefault(name, []).append(_auroc(np.asarray(scores_in), np.asarray(scores_out)))

    def finished(explicit, pattern):
        folders = sorted(root.glob(pattern)) if explicit is None else explicit
        return [folder for folder in folders if (folder / runs.METRICS_NAME).is_file()
                and (folder / SAFETENSORS_WEIGHTS_NAME).is_file()]

    for folder in finished(args.umema_runs, "umema_seed*"):
        run = runs.load_run(folder)
        refresh_novelty_references(run, folder, load_data(IN_DISTRIBUTION)[0], schema)
        pred = [run.method.predict(run.fitted, batches(run, d), progress=False) for d in (inside, outside)]
        add("UMEMA epistemic", *(np.stack(p.epistemic) for p in pred))
        add("UMEMA 1 - confidence", *(1 - np.stack(p.confidence) for p in pred))
        add("UMEMA softmax entropy", *(_entropy(torch.from_numpy(np.stack(p.probs))).numpy() for p in pred))
    ensemble = {"in": [], "out": []}
    for folder in finished(args.lora_runs, "lora_seed*"):
        run = runs.load_run(folder)
        model = run.fitted.model
        probs = [torch.from_numpy(np.stack(run.method.predict(run.fitted, batches(run, d), progress=False).probs))
                 for d in (inside, outside)]
        add("LoRA 1 - max softmax", *(1 - p.amax(-1).numpy() for p in probs))
        add("LoRA softmax entropy", *(_entropy(p).numpy() for p in probs))
        samples = [MCDropout(args.mc_samples).predict_samples(model, batches(run, d)) for d in (inside, outside)]
        add("MC dropout entropy", *(_entropy(s.mean(0)).numpy() for s in samples))
        add("MC dropout mutual information",
            *((_entropy(s.mean(0)) - _entropy(s).mean(0)).numpy() for s in samples))
        ensemble["in"].append(probs[0])
        ensemble["out"].append(probs[1])
    if len(ensemble["in"]) > 1:
        members = {key: torch.stack(value) for key, value in ensemble.items()}
        add("ensemble entropy", *(_entropy(m.mean(0)).numpy() for m in members.values()))
        add("ensemble mutual information",
            *((_entropy(m.mean(0)) - _entropy(m).mean(0)).numpy() for m in members.values()))
    print(f"OOD AUROC ({args.examples} SemEval test sentences vs {args.examples} 20 Newsgroups bodies of {WORDS} words)")
    print("| score | runs | AUROC mean | std |")
    print("|---|---:|---:|---:|")
    for name, values in results.items():
        print(f"| {name} | {len(values)} | {np.mean(values):.3f} | {np.std(values):.3f} |")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
