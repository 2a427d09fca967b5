"""Train UMEMA (and its ablations) next to LoRA on several data sets and seeds, keep every run folder, and store each
run's dev and test predictions with UM's calibration features, so that calibration forms can be compared on held-out
test data without retraining (`--analyse`).

    python benchmarks/calibration_study.py --datasets semeval2010_task8 20newsgroups --seeds 0 1 2 \
        --output-dir runs/calibration-study
    python benchmarks/calibration_study.py --output-dir runs/calibration-study --analyse

Training uses `peft-umema compare`'s defaults (3 epochs, lr 1e-3, batch 16, 128 tokens) at 1,000 shots. Resumable:
a run folder with metrics.json is not trained again, a stored `calibration_inputs.safetensors` is not collected again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from peft_umema.baselines.prediction import collect_logits, labeled
from peft_umema.data.loaders import load_data
from peft_umema.data.preprocessing import k_shot_subset, tokenize_dataset
from peft_umema.evaluation.metrics import (
    error_detection_auroc,
    expected_calibration_error,
)
from peft_umema.experiments import runs
from peft_umema.experiments.methods import dev_batches
from peft_umema.uncertainty import calibration

VARIANTS = {
    "umema": {"method": "umema"},
    "UM_only": {"method": "umema", "use_ema": False},
    "EMA_only": {"method": "umema", "use_um": False},
    "lora": {"method": "lora"},
}
INPUTS_NAME = "calibration_inputs.safetensors"


def run_folder(root: Path, data: str, variant: str, seed: int) -> Path:
    return root / Path(data).name / f"{variant}_seed{seed}"


def _collect_plain(model, dataloader) -> dict[str, torch.Tensor]:
    """Logits and labels per labelled position, for runs without UM (as `calibration._collect` lays them out)."""
    collected = collect_logits(model, dataloader)
    rows = torch.arange(len(collected.labels)).view(-1, *([1] * (collected.labels.dim() - 1)))
    logits, labels = labeled(collected.logits.double(), collected.labels)
    return {"raw_logits": logits, "labels": labels, "group": labeled(rows.expand_as(collected.labels), collected.labels)[0]}


def refresh_novelty_references(run, folder: Path, splits, schema) -> None:
    """What training does at its end, over the run's own k-shot subset: for runs of this version it recomputes what
    they hold; runs saved before the references existed get them here."""
    tuner = run.fitted.model.base_model
    if not hasattr(tuner, "refresh_novelty_references"):
        return
    metrics = json.loads((folder / runs.METRICS_NAME).read_text())
    train = k_shot_subset(splits["train"], metrics["shots"], metrics["seed"], schema=schema)
    tokenized = tokenize_dataset(train, run.tokenizer, run.info["max_length"], schema=schema)
    tuner.refresh_novelty_references(dev_batches(tokenized, run.task_type, run.tokenizer, 32))


def collect(folder: Path, data: str) -> None:
    """Store the dev and test collections of one run folder."""
    if (folder / INPUTS_NAME).is_file():
        return
    run = runs.load_run(folder)
    splits, schema = load_data(data)
    model = run.fitted.model
    refresh_novelty_references(run, folder, splits, schema)
    tensors = {}
    for split in ("validation", "test"):
        tokenized = tokenize_dataset(splits[split], run.tokenizer, run.info["max_length"], schema=schema)
        batches = dev_batches(tokenized, run.task_type, run.tokenizer, 32)
        if hasattr(model.base_model, "umema_modules") and model.peft_config[model.active_adapter].use_um:
            collected = calibration._collect(model, model.base_model, model.active_adapter, batches)
        else:
            collected = _collect_plain(model, batches)
        tensors.update({f"{split}.{name}": value.contiguous() for name, value in collected.items()})
    save_file(tensors, folder / INPUTS_NAME)


def train_all(args) -> None:
    root = Path(args.output_dir)
    for seed in args.seeds:
        for data in args.datasets:
            for variant in args.variants:
                folder = run_folder(root, data, variant, seed)
                if not (folder / runs.METRICS_NAME).is_file():
                    options = dict(VARIANTS[variant])
                    print(f"training {variant} on {data}, seed {seed}", flush=True)
                    runs.train(args.model, data, folder, shots=args.shots, seed=seed, method=options.pop("method"),
                               max_steps=args.max_steps, progress=False,
                               **({"epochs": args.epochs} if args.epochs else {}), **options)
                collect(folder, data)
                test = json.loads((folder / runs.METRICS_NAME).read_text())["test"]
                print(f"{data} {variant} seed {seed}: " + json.dumps({k: round(v, 4) for k, v in test.items()
                                                                      if isinstance(v, float)}), flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Analysis: calibration forms fitted on dev, scored on test
# ----------------------------------------------------------------------------------------------------------------


def _split(tensors: dict, split: str) -> dict:
    return {name.split(".", 1)[1]: value for name, value in tensors.items() if name.startswith(split + ".")}


def _scores(probs: torch.Tensor, labels: torch.Tensor, outside: int | None) -> dict:
    """Top-label scores; for token tasks also the ECE over entity tokens (gold label not `O`)."""
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).numpy()
    scores = {
        "acc": float(correct.mean()),
        "ece": float(expected_calibration_error(confidence.numpy(), correct)),
        "nll": float(torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels)),
        "auroc": float(error_detection_auroc(confidence.numpy(), correct)),
    }
    if outside is not None:
        entity = (labels != outside).numpy()
        scores["entity_ece"] = float(expected_calibration_error(confidence.numpy()[entity], correct[entity]))
    return scores


def _constant_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    calibration._lbfgs([log_t], lambda: torch.nn.functional.cross_entropy(logits / log_t.exp(), labels))
    return float(log_t.detach().exp())


def _uniform_mixture(logits: torch.Tensor, labels: torch.Tensor, temperature: float):
    """(1 - lam) softmax(z / T) + lam / C with lam fitted on dev NLL (T from temperature scaling)."""
    raw_lam = torch.tensor(-6.0, dtype=torch.float64, requires_grad=True)

    def probs(z, lam):
        return (1 - lam) * torch.softmax(z / temperature, -1) + lam / z.shape[-1]

    calibration._lbfgs([raw_lam], lambda: torch.nn.functional.nll_loss(
        probs(logits, torch.sigmoid(raw_lam)).log(), labels))
    lam = float(torch.sigmoid(raw_lam.detach()))
    return lambda z: probs(z, lam), lam


def _um_forms(dev: dict, test: dict) -> dict[str, torch.Tensor]:
    """Test probabilities of each temperature form of UM, fitted on dev."""
    from types import SimpleNamespace

    from peft_umema.uncertainty.calibrator import (
        LOGIT_FEATURES,
        UNCERTAINTY_FEATURES,
        TemperatureCalibrator,
    )

    memory_dim = dev["features"].shape[1] - len(UNCERTAINTY_FEATURES) - len(LOGIT_FEATURES)
    joined = {name: torch.cat([dev[name], test[name]]) for name in dev}
    joined["group"] = torch.cat([dev["group"], test["group"] + int(dev["group"].max()) + 1])
    dev_rows = torch.arange(len(dev["labels"]))
    test_rows = torch.arange(len(dev["labels"]), len(joined["labels"]))
    fit = calibration._TemperatureFit(joined, memory_dim)
    forms = {}
    for form in ("identity", "parameterised"):
        params = fit.fit(form, dev_rows)
        forms[form] = torch.softmax(joined["raw_logits"][test_rows] /
                                    fit.log_temperature(params, test_rows).exp().unsqueeze(-1), -1)
    # the library's choice (two-fold check on dev), applied through the real calibrator
    calibrator = TemperatureCalibrator(memory_dim).double()
    report = calibration._fit_temperature(SimpleNamespace(calibrator=calibrator), dict(dev))
    calibrator.is_fitted = bool(calibrator.fitted)
    temperature = calibrator(test["features"], test["um_temperature"])
    forms[f"library fit ({report['temperature_fit']})"] = torch.softmax(
        test["raw_logits"] / temperature.unsqueeze(-1), -1)
    return forms


def print_histories(root: Path) -> None:
    """Per run and epoch: UM's mean training temperature and confidence, and the dev ECE / NLL of the softmax."""
    print("| data | variant | seed | epoch | mean T (train) | mean confidence (train) | dev accuracy | dev ECE | dev NLL |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for path in sorted(root.glob(f"*/*/{runs.METRICS_NAME}")):
        metrics = json.loads(path.read_text())
        variant, seed = path.parent.name.rsplit("_seed", 1)
        train_logs = {round(entry["epoch"]): entry for entry in metrics["history"] if "loss" in entry}
        for entry in (entry for entry in metrics["history"] if "eval_ece" in entry):
            logs = train_logs.get(round(entry["epoch"]), {})
            print(f"| {path.parent.parent.name} | {variant} | {seed} | {entry['epoch']:.0f} | "
                  f"{logs.get('mean_temperature', float('nan')):.3f} | {logs.get('mean_confidence', float('nan')):.3f} | "
                  f"{entry['eval_accuracy']:.4f} | {entry['eval_ece']:.4f} | {entry['eval_nll']:.4f} |")


SUMMARY_FORMS = {("lora", "raw"): "LoRA", ("lora", "TS ("): "LoRA + TS", ("umema", "library fit"): "UMEMA (default)",
                 ("umema", "TS ("): "UMEMA logits + TS"}


def print_summary(rows) -> None:
    """Mean +- std over seeds of the methods the issue compares, per data set."""
    import numpy as np

    grouped: dict[tuple[str, str], list[dict]] = {}
    for data, variant, _seed, form, scores in rows:
        for (wanted_variant, prefix), label in SUMMARY_FORMS.items():
            if variant == wanted_variant and form.startswith(prefix):
                grouped.setdefault((data, label), []).append(scores)
    print("| data | method | seeds | accuracy | ECE | NLL | error AUROC |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (data, label), values in sorted(grouped.items(), key=lambda item: (item[0][0], list(SUMMARY_FORMS.values())
                                                                            .index(item[0][1]))):
        cells = []
        for key in ("acc", "ece", "nll", "auroc"):
            numbers = np.array([value[key] for value in values])
            cells.append(f"{numbers.mean():.4f} +- {numbers.std(ddof=1):.4f}" if len(numbers) > 1
                         else f"{numbers[0]:.4f}")
        print(f"| {data} | {label} | {len(values)} | " + " | ".join(cells) + " |")


def analyse(args) -> None:
    root = Path(args.output_dir)
    print_histories(root)
    rows = []
    for inputs in sorted(root.glob(f"*/*/{INPUTS_NAME}")):
        tensors = load_file(inputs)
        dev, test = _split(tensors, "validation"), _split(tensors, "test")
        data, (variant, seed) = inputs.parent.parent.name, inputs.parent.name.rsplit("_seed", 1)
        metrics = json.loads((inputs.parent / runs.METRICS_NAME).read_text())
        outside = metrics["label_names"].index("O") if metrics["task_type"] == "TOKEN_CLS" else None
        forms = {"raw": torch.softmax(test["raw_logits"], -1)}
        t = _constant_temperature(dev["raw_logits"], dev["labels"])
        forms[f"TS (T={t:.2f})"] = torch.softmax(test["raw_logits"] / t, -1)
        mixture, lam = _uniform_mixture(dev["raw_logits"], dev["labels"], t)
        forms[f"TS + uniform (lam={lam:.3f})"] = mixture(test["raw_logits"])
        if "features" in dev:
            forms.update(_um_forms(dev, test))
        for form, probs in forms.items():
            rows.append((data, variant, seed, form, _scores(probs, test["labels"], outside)))
    print_summary(rows)
    print()
    print("| data | variant | seed | form | acc | ECE | NLL | error AUROC | entity-token ECE |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for data, variant, seed, form, s in rows:
        entity = f"{s['entity_ece']:.4f}" if "entity_ece" in s else "-"
        print(f"| {data} | {variant} | {seed} | {form} | {s['acc']:.4f} | {s['ece']:.4f} | {s['nll']:.4f} | "
              f"{s['auroc']:.4f} | {entity} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--datasets", nargs="+", default=["semeval2010_task8"])
    parser.add_argument("--shots", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=["umema", "lora"], choices=list(VARIANTS))
    parser.add_argument("--epochs", type=float, default=None, help="most epochs (default: compare's, 3)")
    parser.add_argument("--max-steps", type=int, default=-1, help="smoke runs only")
    parser.add_argument("--output-dir", default="calibration-study")
    parser.add_argument("--analyse", action="store_true", help="only compare calibration forms on stored runs")
    args = parser.parse_args()
    analyse(args) if args.analyse else train_all(args)


if __name__ == "__main__":
    main()
