"""Share UMEMA adapters on the Hugging Face Hub, with a model card that says how to load them.

`PeftModel.push_to_hub` writes transformers' generic model card, which lacks the `import peft_umema` that loading
needs (peft knows the UMEMA type only after it; without it loading fails with `KeyError: 'UMEMA'`), and says
nothing about calibration. `push_to_hub` here uploads the adapter (weights and memory bank, both in
`adapter_model.safetensors`) with a card naming the base model, the task, the calibration figures of the last
evaluation and the loading code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from huggingface_hub import HfApi, ModelCard, ModelCardData
from peft import PeftModel
from transformers import Trainer

from .experiments import runs as run

CARD_NAME = "README.md"
PIPELINE_TAGS = {"SEQ_CLS": "text-classification", "TOKEN_CLS": "token-classification"}
TASK_NAMES = {"SEQ_CLS": "sequence classification", "TOKEN_CLS": "token classification (BIO tagging)"}
METHOD_NAMES = {
    "umema": "UMEMA (LoRA + Uncertainty Modeling + External Memory Augmentation, Ma et al., PLOS ONE 2026)",
    "lora": "LoRA",
}
METRIC_NAMES = {
    "accuracy": "Accuracy",
    "macro_f1": "Macro-F1",
    "precision": "Entity span precision",
    "recall": "Entity span recall",
    "f1": "Entity span F1",
    "ece": "ECE (15 bins)",
    "nll": "NLL",
    "brier": "Brier score",
    "auroc_error": "Error-detection AUROC",
    "aurc": "AURC (risk-coverage)",
    "um_confidence_ece": "ECE of UM's confidence",
    "um_confidence_auroc_error": "Error-detection AUROC of UM's confidence",
    "um_confidence_aurc": "AURC of UM's confidence",
}
# Files of a run folder that belong on the hub; checkpoints and anything else stay local.
RUN_FOLDER_SUFFIXES = (".json", ".safetensors", ".png", ".txt", ".model", ".jinja")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# The hub checkpoints behind `peft_umema.experiments.backbones`' offline short names, for the card's `base_model`.
SHORT_NAME_CHECKPOINTS = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def push_to_hub(
    source: PeftModel | Trainer | str | os.PathLike,
    repo_id: str,
    *,
    tokenizer: Any = None,
    metrics: Optional[dict[str, float]] = None,
    token: Optional[str] = None,
    endpoint: Optional[str] = None,
    private: Optional[bool] = None,
    commit_message: str = "Upload UMEMA adapter",
):
    """Upload an adapter with its memory and a `peft_umema` model card to `repo_id`; returns the commit info.

    Args:
        source: a `PeftModel`, a `Trainer` (its model, tokenizer and last evaluation are pushed), or a run folder
            written by `train` (adapter, tokenizer, `umema_run.json`, `metrics.json`, `reliability.png`).
        tokenizer: uploaded beside the adapter when given (a Trainer's own is used otherwise), so that
            `peft-umema predict` works on the pulled folder.
        metrics: calibration figures for the card; default: the run folder's test metrics, or the Trainer's last
            evaluation.
        token, endpoint, private: passed to `huggingface_hub.HfApi` / `create_repo`.
    """
    with tempfile.TemporaryDirectory(prefix="umema-push-") as staging:
        folder = Path(staging)
        info, found_metrics, evaluated_on = _stage(source, folder, tokenizer)
        if metrics is not None:
            found_metrics, evaluated_on = metrics, "as given to push_to_hub"
        model_card(repo_id, info, found_metrics, evaluated_on).save(folder / CARD_NAME)
        api = HfApi(endpoint=endpoint, token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)


def _stage(source, folder: Path, tokenizer) -> tuple[dict, Optional[dict], Optional[str]]:
    """Write what to upload into `folder`; returns the run info, the last evaluation's metrics, and what it was."""
    if isinstance(source, (str, os.PathLike)):
        return _stage_run_folder(Path(source), folder)
    if isinstance(source, Trainer):
        info = _stage_model(source.model, folder, source.processing_class if tokenizer is None else tokenizer)
        return (info, *_last_evaluation(source))
    if isinstance(source, PeftModel):
        return _stage_model(source, folder, tokenizer), None, None
    raise TypeError(
        f"push_to_hub takes a PeftModel, a transformers Trainer or a run folder, got {type(source).__name__}."
    )


def _stage_run_folder(run_dir: Path, folder: Path) -> tuple[dict, Optional[dict], Optional[str]]:
    info = run.read_run_info(run_dir)
    for file in run_dir.iterdir():
        if file.is_file() and file.name != CARD_NAME and file.suffix in RUN_FOLDER_SUFFIXES:
            shutil.copy2(file, folder / file.name)
    metrics_file = run_dir / run.METRICS_NAME
    if not metrics_file.is_file():
        return info, None, None
    recorded = json.loads(metrics_file.read_text(encoding="utf-8"))
    test_size = recorded.get("sizes", {}).get("test")
    return info, recorded.get("test"), f"test split of {recorded.get('data')}" + (
        f", {test_size} examples" if test_size else ""
    )


def _stage_model(model, folder: Path, tokenizer) -> dict:
    model = _unwrap(model)
    if not isinstance(model, PeftModel):
        raise TypeError(f"Expected a peft PeftModel (from get_peft_model), got {type(model).__name__}.")
    model.save_pretrained(folder)
    info = run.run_info_for(model)
    if tokenizer is not None:  # with the tokenizer, the pulled folder is a complete run folder
        tokenizer.save_pretrained(folder)
        run.write_json(folder / run.RUN_INFO_NAME, info)
    return info


def _unwrap(model):
    """The PeftModel inside DDP/accelerate wrappers."""
    while hasattr(model, "module") and not isinstance(model, PeftModel):
        model = model.module
    return model


def _last_evaluation(trainer: Trainer) -> tuple[Optional[dict[str, float]], Optional[str]]:
    """The metrics of the Trainer's latest evaluation, whatever its `metric_key_prefix` ("eval", "test", ...)."""
    for entry in reversed(trainer.state.log_history):
        for prefix in sorted({key.split("_", 1)[0] for key in entry if "_" in key}):
            metrics = {name: entry[f"{prefix}_{name}"] for name in METRIC_NAMES if f"{prefix}_{name}" in entry}
            if metrics:
                return metrics, f"Trainer's last evaluation (its `{prefix}_*` metrics)"
    return None, None


def model_card(repo_id: str, info: dict, metrics: Optional[dict], evaluated_on: Optional[str]) -> ModelCard:
    """The card: what the adapter is, how to load it (with `import peft_umema`), and how calibrated it was."""
    task_type, backbone, labels = info["task_type"], info["backbone"], info["label_names"]
    checkpoint = SHORT_NAME_CHECKPOINTS.get(backbone.lower())
    if checkpoint is None and HUB_ID.fullmatch(backbone) and not Path(backbone).exists():
        checkpoint = backbone
    card_data = ModelCardData(
        library_name="peft",
        base_model=checkpoint,
        pipeline_tag=PIPELINE_TAGS[task_type],
        tags=["peft_umema", info["method"], "lora", "uncertainty", "calibration"],
    )
    method = METHOD_NAMES.get(info["method"], info["method"])
    lines = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A {method} adapter for **{TASK_NAMES[task_type]}** on the base model **`{backbone}`**"
        + (f" ({checkpoint})" if checkpoint not in (None, backbone) else "")
        + ", made with the `peft_umema` package.",
        "",
        f"Labels ({len(labels)}): " + ", ".join(f"`{label}`" for label in labels) + ".",
    ]
    if info.get("data"):
        lines += ["", f"Trained on: `{info['data']}`."]
    lines += ["", "## Calibration of the last evaluation", ""]
    if metrics:
        lines += [f"Evaluated on the {evaluated_on}.", "", "| metric | value |", "| --- | --- |"]
        lines += [
            f"| {title} | {metrics[name]:.4f} |"
            for name, title in METRIC_NAMES.items()
            if isinstance(metrics.get(name), (int, float))
        ]
    else:
        lines += ["Not evaluated before this upload."]
    lines += ["", "## Usage", "", "```python", *_usage_code(repo_id, info), "```", ""]
    if info["method"] == "umema":
        lines += [
            "The logits are calibrated (divided by UM's temperature); `outputs.confidence`, `outputs.aleatoric` and",
            "`outputs.epistemic` are given per example (sequence classification) or per token (token classification).",
            "The memory bank is part of `adapter_model.safetensors` and is restored by `PeftModel.from_pretrained`.",
            "",
        ]
    lines += [
        f"From the command line: `hf download {repo_id} --local-dir adapter` then",
        "`peft-umema predict adapter \"some text\"` (needs `pip install peft_umema`).",
    ]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def _usage_code(repo_id: str, info: dict) -> list[str]:
    """`load_backbone` resolves peft_umema's short backbone names (`minilm`) as well as hub names and folders."""
    return [
        "import peft_umema  # registers the UMEMA adapter type with peft (without it: KeyError: 'UMEMA')",
        "from peft import PeftModel",
        "from peft_umema.experiments.backbones import load_backbone",
        "",
        f"labels = {info['label_names']!r}",
        f"base, tokenizer = load_backbone({info['backbone']!r}, {info['task_type']!r}, len(labels), id2label=labels"
        + "".join(f", {flag}=True" for flag in ("load_in_4bit", "load_in_8bit") if info.get(flag)) + ")",
        f"model = PeftModel.from_pretrained(base, {repo_id!r}).eval()",
        'outputs = model(**tokenizer(["some text"], return_tensors="pt"))',
    ]
