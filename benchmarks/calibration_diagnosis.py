"""Where UMEMA's calibration and accuracy come from: UMEMA with the temperature fitted on dev (default) or trained
jointly (the paper read literally), UM only, EMA only, plain LoRA (+ temperature scaling) and LoRA trained with a
fixed temperature equal to UM's floor (`min_temperature`: does a collapsed T earn accuracy only by scaling the
logits?), on one data set.

    python benchmarks/calibration_diagnosis.py --data bbc_news_demo --shots 400 --seeds 0 --output-dir diagnosis

Resumable: a variant whose run folder holds metrics.json is not run again. Prints, per variant and epoch, the mean
training temperature and confidence and the dev ECE / NLL of the softmax, then the test scores after the dev fit.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from peft_umema import UMEMAConfig
from peft_umema.baselines.prediction import classification_head
from peft_umema.experiments import runs
from peft_umema.experiments.methods import LoRAMethod, RunSetup, register_method


class FixedTemperatureLoRA(LoRAMethod):
    """Plain LoRA whose head output is divided by a fixed temperature, in training and prediction alike."""

    name = "lora, fixed T"
    description = "LoRA with logits / T for a fixed T (UM's floor)"
    temperature = UMEMAConfig.min_temperature

    def peft_config(self, setup: RunSetup, model):
        # on the backbone's head before peft wraps it: the trained copy peft makes of it keeps the hook
        classification_head(model).register_forward_hook(lambda _module, _inputs, logits: logits / self.temperature)
        return super().peft_config(setup, model)


register_method(FixedTemperatureLoRA())

VARIANTS = {
    "umema": {"method": "umema"},
    "umema, joint T": {"method": "umema", "temperature_training": "joint"},
    "umema, logit scale 2": {"method": "umema", "logit_scale": 2.0},
    "UM only, logit scale 2": {"method": "umema", "use_ema": False, "logit_scale": 2.0},
    "UM only": {"method": "umema", "use_ema": False},
    "EMA only": {"method": "umema", "use_um": False},
    "lora": {"method": "lora"},
    "lora+ts": {"method": "lora+ts"},
    "lora, fixed T": {"method": FixedTemperatureLoRA.name},
}
TEST_KEYS = ("accuracy", "macro_f1", "f1", "ece", "nll", "brier", "auroc_error")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--data", default="bbc_news_demo")
    parser.add_argument("--shots", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--output-dir", default="calibration-diagnosis")
    args = parser.parse_args()
    root = Path(args.output_dir)
    for seed in args.seeds:
        for name in args.variants:
            folder = root / f"{name.replace(' ', '_').replace(',', '')}_seed{seed}"
            if not (folder / runs.METRICS_NAME).is_file():
                options = dict(VARIANTS[name])
                runs.train(args.model, args.data, folder, shots=args.shots, seed=seed, epochs=args.epochs,
                           learning_rate=args.learning_rate,
                           method=options.pop("method"), **options)
            metrics = json.loads((folder / runs.METRICS_NAME).read_text())
            print(f"\n## {name}, seed {seed}")
            print("| epoch | mean T (train) | mean confidence (train) | dev ECE | dev NLL |")
            print("|---:|---:|---:|---:|---:|")
            train_logs = {round(e["epoch"]): e for e in metrics.get("history", []) if "loss" in e}
            for entry in (e for e in metrics.get("history", []) if "eval_ece" in e):
                logs = train_logs.get(round(entry["epoch"]), {})
                print(f"| {entry['epoch']:.0f} | {logs.get('mean_temperature', float('nan')):.3f} | "
                      f"{logs.get('mean_confidence', float('nan')):.3f} | {entry['eval_ece']:.4f} | "
                      f"{entry['eval_nll']:.4f} |")
            test = {key: metrics["test"][key] for key in TEST_KEYS if key in metrics["test"]}
            print("test:", json.dumps(test), "| dev fit:", json.dumps(metrics.get("dev_calibration", {})))


if __name__ == "__main__":
    main()
