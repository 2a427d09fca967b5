"""Fine-tune MiniLM with a UMEMA adapter for named entities in tweets (WNUT-16) with the Hugging Face Trainer, offline.

    python examples/train_token_classification.py            # a few minutes on a laptop CPU
    python examples/train_token_classification.py --quick    # a few steps, to check that everything runs

Each word's tag goes on its first sub-token (the others get -100); entity span F1 (seqeval) selects the best
epoch, and calibration is measured over the labelled tokens. UMEMA gives a confidence, an aleatoric and an
epistemic uncertainty per token.
"""

import argparse

import torch
from peft import get_peft_model
from transformers import (
    DataCollatorForTokenClassification,
    EarlyStoppingCallback,
    TrainingArguments,
)

import peft_umema  # noqa: F401  (registers the UMEMA adapter type with peft)
from peft_umema import UMEMAConfig
from peft_umema.data.loaders import label_names_of, load_benchmark
from peft_umema.data.preprocessing import tokenize_dataset
from peft_umema.evaluation.metrics import token_classification_metrics
from peft_umema.experiments.backbones import load_backbone
from peft_umema.training.trainer import UMEMATrainer

# LoRA on every linear layer of the encoder (attention and feed-forward), not only query and value
BERT_LINEAR_LAYERS = ["query", "key", "value", "dense"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: all epochs)")
    parser.add_argument("--quick", action="store_true", help="2 steps on 32 sentences: a smoke test")
    parser.add_argument("--output-dir", default="umema-wnut16")
    args = parser.parse_args()

    data = load_benchmark("wnut16_demo")
    label_names = label_names_of(data)
    if args.quick:
        data = {split: data[split].select(range(32 if split == "train" else 16)) for split in data}

    model, tokenizer = load_backbone("minilm", "TOKEN_CLS", num_labels=len(label_names), id2label=label_names)
    config = UMEMAConfig(task_type="TOKEN_CLS", r=8, lora_alpha=16, lora_dropout=0.1, target_modules=BERT_LINEAR_LAYERS)
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    tokenized = {split: tokenize_dataset(dataset, tokenizer, max_length=64) for split, dataset in data.items()}

    def compute_metrics(evaluation):
        # (logits, confidence, aleatoric, epistemic, temperature) per token, padded; positions labelled -100 are skipped
        logits, confidence = evaluation.predictions[:2]
        probs = torch.from_numpy(logits).softmax(-1)
        metrics = token_classification_metrics(probs, evaluation.label_ids, label_names)
        um = token_classification_metrics(probs, evaluation.label_ids, label_names, confidences=confidence)
        metrics["um_auroc_error"] = um["auroc_error"]
        return metrics

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
        metric_for_best_model="f1",
        report_to=[],
    )
    trainer = UMEMATrainer(  # adds the memory update after every optimizer step and the confidence loss
        model=model,
        args=training_args,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["validation"],
        data_collator=DataCollatorForTokenClassification(tokenizer),
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        callbacks=[EarlyStoppingCallback(early_stopping_patience=2)],
    )
    trainer.train()
    test_metrics = trainer.evaluate(tokenized["test"], metric_key_prefix="test")
    print({name: round(value, 4) for name, value in test_metrics.items() if isinstance(value, float)})
    model.save_pretrained(f"{args.output_dir}/adapter")  # LoRA, UM, EMA and the memory bank in one file

    model.eval()
    words = ["Watching", "the", "Yankees", "game", "in", "New", "York", "tonight"]
    encoded = tokenizer(words, is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**encoded)
    probs = outputs.logits.softmax(-1)[0]
    seen = set()
    for position, word_index in enumerate(encoded.word_ids()):
        if word_index is None or word_index in seen:  # one row per word: its first sub-token
            continue
        seen.add(word_index)
        label = int(probs[position].argmax())
        print(
            f"{words[word_index]:<10} {label_names[label]:<16} probability {probs[position, label]:.3f}  "
            f"confidence {outputs.confidence[0, position]:.3f}  aleatoric {outputs.aleatoric[0, position]:.4f}  "
            f"epistemic {outputs.epistemic[0, position]:.4f}"
        )


if __name__ == "__main__":
    main()
