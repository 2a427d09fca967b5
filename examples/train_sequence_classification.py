"""Fine-tune MiniLM with a UMEMA adapter on BBC News (5 topics) with the Hugging Face Trainer, offline.

    python examples/train_sequence_classification.py            # a few minutes on a laptop CPU
    python examples/train_sequence_classification.py --quick    # a few steps, to check that everything runs

Shows the pieces `peft-umema train` puts together: load data and backbone, wrap with `UMEMAConfig`, train with
`UMEMATrainer` (early stopping on dev macro-F1), score calibration on the test split, save, and read the calibrated
probabilities and UM's confidence and uncertainties off the model's outputs.
"""

import argparse

import torch
from peft import get_peft_model
from transformers import (
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    TrainingArguments,
)

import peft_umema  # noqa: F401  (registers the UMEMA adapter type with peft)
from peft_umema import UMEMAConfig
from peft_umema.data.loaders import label_names_of, load_benchmark
from peft_umema.data.preprocessing import k_shot_subset, tokenize_dataset
from peft_umema.evaluation.metrics import classification_metrics
from peft_umema.experiments.backbones import load_backbone
from peft_umema.training.trainer import UMEMATrainer

# LoRA on every linear layer of the encoder (attention and feed-forward), not only query and value
BERT_LINEAR_LAYERS = ["query", "key", "value", "dense"]


def compute_metrics(evaluation):
    # UMEMA models output (logits, confidence, aleatoric, epistemic, temperature); the logits are calibrated.
    logits, confidence = evaluation.predictions[:2]
    probs = torch.from_numpy(logits).softmax(-1)
    metrics = classification_metrics(probs, evaluation.label_ids)
    # UM's confidence is trained to predict whether the prediction is right: how well does it flag errors?
    metrics["um_auroc_error"] = classification_metrics(probs, evaluation.label_ids, confidence)["auroc_error"]
    return metrics


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=400, help="training examples (seeded, stratified)")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: all epochs)")
    parser.add_argument("--quick", action="store_true", help="2 steps on 32 examples: a smoke test")
    parser.add_argument("--output-dir", default="umema-bbc-news")
    args = parser.parse_args()

    data = load_benchmark("bbc_news_demo")
    label_names = label_names_of(data)
    data["train"] = k_shot_subset(data["train"], 32 if args.quick else args.shots, seed=0)
    if args.quick:
        data["validation"], data["test"] = data["validation"].select(range(16)), data["test"].select(range(16))

    model, tokenizer = load_backbone("minilm", "SEQ_CLS", num_labels=len(label_names), id2label=label_names)
    config = UMEMAConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1, target_modules=BERT_LINEAR_LAYERS)
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    tokenized = tokenize_dataset(data, tokenizer, max_length=128)

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=32,
        learning_rate=1e-3,
        num_train_epochs=args.epochs,
        max_steps=2 if args.quick else args.max_steps,
        warmup_steps=0.1,
        max_grad_norm=1.0,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="macro_f1",
        report_to=[],
    )
    trainer = UMEMATrainer(  # adds the memory update after every optimizer step and the confidence loss
        model=model,
        args=training_args,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["validation"],
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        callbacks=[EarlyStoppingCallback(early_stopping_patience=2)],
    )
    trainer.train()
    test_metrics = trainer.evaluate(tokenized["test"], metric_key_prefix="test")
    print({name: round(value, 4) for name, value in test_metrics.items() if isinstance(value, float)})
    model.save_pretrained(f"{args.output_dir}/adapter")  # LoRA, UM, EMA and the memory bank in one file

    model.eval()
    text = "The central bank raised interest rates again as inflation climbed to its highest level in a decade."
    with torch.no_grad():
        outputs = model(**tokenizer(text, return_tensors="pt"))
    probs = outputs.logits.softmax(-1)[0]
    label = int(probs.argmax())
    print(
        f"{label_names[label]}: probability {probs[label]:.3f}, UM confidence {outputs.confidence[0]:.3f}, "
        f"aleatoric {outputs.aleatoric[0]:.4f}, epistemic {outputs.epistemic[0]:.4f}"
    )


if __name__ == "__main__":
    main()
