"""`peft-umema`: train, evaluate and predict with UMEMA adapters from the command line.

`peft-umema train` with no arguments runs the offline demo (MiniLM on BBC News). Errors caused by the input (a
missing folder, an unreadable data file, a bad option value) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from .experiments import runs as run
from .experiments.methods import METHODS

PROGRAM = "peft-umema"
USAGE_ERROR = 2
# Errors of the user's input; anything else is a bug and keeps its traceback.
INPUT_ERRORS = (FileNotFoundError, NotADirectoryError, ModuleNotFoundError, ConnectionError, ValueError)
UNCERTAINTY_COLUMNS = ("probability", "confidence", "aleatoric", "epistemic")
SUMMARY_METRICS = ("accuracy", "macro_f1", "precision", "recall", "f1", "ece", "nll", "brier", "auroc_error", "aurc",
                   "um_confidence_ece", "um_confidence_auroc_error", "um_confidence_aurc")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description="LoRA + Uncertainty Modeling + External Memory Augmentation (UMEMA) adapters."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    defaults = run.TrainOptions()

    train = commands.add_parser(
        "train",
        help="fine-tune a backbone and save the run (no arguments: the offline MiniLM / BBC News demo)",
        description="Fine-tune a backbone, keep the best epoch on dev, score the test split, and write the adapter, "
        "metrics.json and reliability.png to --output-dir.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_model_and_data(train, defaults)
    train.add_argument("--output-dir", default=run.DEFAULT_OUTPUT_DIR, help="run folder to write")
    train.add_argument("--method", default="umema", choices=sorted(METHODS),
                       help="; ".join(f"{name}: {method.description}" for name, method in sorted(METHODS.items())))
    train.add_argument("--shots", type=_shots, default=run.DEFAULT_SHOTS,
                       help="train on this many examples (seeded, stratified); 'all' for the whole split")
    train.add_argument("--seed", type=int, default=0, help="seeds the subset, initialisation and data order")
    train.add_argument("--use-um", action=argparse.BooleanOptionalAction, default=defaults.use_um,
                       help="Uncertainty Modeling (umema method)")
    train.add_argument("--use-ema", action=argparse.BooleanOptionalAction, default=defaults.use_ema,
                       help="External Memory Augmentation (umema method)")
    train.add_argument("--missing-rate", type=float, default=0.0,
                       help="drop this fraction of the words of every example (missing-information study)")
    _add_training_options(train, defaults)
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser(
        "evaluate", help="score a saved run on a data set",
        description="Score a run folder written by `train` on a split of DATA (labels matched by name).",
    )
    evaluate.add_argument("adapter", metavar="ADAPTER", help="run folder written by `peft-umema train`")
    evaluate.add_argument("data", metavar="DATA", help="benchmark name, local path, or hub data set")
    evaluate.add_argument("--split", default="test", help="split to score (default: test)")
    evaluate.add_argument("--missing-rate", type=float, default=0.0,
                          help="drop this fraction of the words of every example first (default: 0)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the dropped words (default: 0)")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--output", type=Path, help="also write the result as JSON to this file")
    evaluate.add_argument("--reliability", type=Path, help="also draw the reliability diagram to this PNG file")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_data_options(evaluate, skip_empty_default=None)
    evaluate.set_defaults(handler=_evaluate)

    predict = commands.add_parser(
        "predict", help="label texts with a saved run, with confidence and uncertainty",
        description="Print the label, its calibrated probability, the confidence and the aleatoric and epistemic "
        "uncertainty of each text (of each word, for token classification).",
    )
    predict.add_argument("adapter", metavar="ADAPTER", help="run folder written by `peft-umema train`")
    predict.add_argument("texts", metavar="TEXT", nargs="+", help="text(s) to label")
    predict.add_argument("--json", action="store_true", help="print JSON instead of tables")
    predict.set_defaults(handler=_predict)

    compare = commands.add_parser(
        "compare", help="train every method under every seed on one split and tabulate them",
        description="Run methods side by side (same backbone, same k-shot subset per seed) and write comparison.md "
        "(mean +- std over seeds), comparison.json and reliability diagrams to --output-dir.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_model_and_data(compare, defaults)
    compare.add_argument("--methods", nargs="+", default=sorted(METHODS), choices=sorted(METHODS),
                         metavar="METHOD", help=f"methods to compare, from: {', '.join(sorted(METHODS))}")
    compare.add_argument("--shots", type=_shots, default=200, help="training examples per seed; 'all' for all")
    compare.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one run of every method per seed")
    compare.add_argument("--output-dir", default="umema-comparison", help="folder for the table and diagrams")
    compare.add_argument("--dev-size", type=int, help="score on a fixed seeded subset of this many dev examples")
    compare.add_argument("--test-size", type=int, help="score on a fixed seeded subset of this many test examples")
    _add_training_options(compare, defaults)
    compare.set_defaults(handler=_compare)
    return parser


def _add_model_and_data(parser: argparse.ArgumentParser, defaults: run.TrainOptions) -> None:
    parser.add_argument("--model", default=run.DEFAULT_MODEL, help="backbone: minilm, smollm2-135m, hub name or folder")
    parser.add_argument("--data", default=run.DEFAULT_DATA,
                        help="benchmark name (20newsgroups, semeval2010_task8, wnut17, ploner[:domain], wnut16_demo, "
                        "bbc_news_demo), path of your data (CSV, TSV, JSON, JSON lines, Parquet or CoNLL file, or a "
                        "folder of train/dev/test files), or hub data set")
    parser.add_argument("--rank", type=int, default=defaults.rank, help="LoRA rank")
    _add_data_options(parser)


def _add_data_options(parser: argparse.ArgumentParser, skip_empty_default: Optional[bool] = False) -> None:
    """How to read the user's own data files (found by their common names when not given)."""
    group = parser.add_argument_group("your data's columns (found by their common names when not given)")
    group.add_argument("--text-column", nargs="+", metavar="COLUMN",
                       help="text column, or two for a sentence-pair task; found by name: text, sentence, ...")
    group.add_argument("--label-column", metavar="COLUMN",
                       help="class column; found by name: label, category, intent, class, ...")
    group.add_argument("--tokens-column", metavar="COLUMN",
                       help="word-list column of a token task; found by name: tokens, words")
    group.add_argument("--tags-column", metavar="COLUMN",
                       help="tag-list column of a token task; found by name: ner_tags, tags, labels")
    group.add_argument("--label-names", metavar="A,B,C",
                       help="class names in id order, comma-separated (else sorted); they name integer labels")
    group.add_argument("--skip-empty", action="store_true", default=skip_empty_default,
                       help="drop empty documents and sentences (counted in a warning) instead of failing")


def _data_options(args: argparse.Namespace) -> dict:
    return dict(
        text_column=args.text_column, label_column=args.label_column, tokens_column=args.tokens_column,
        tags_column=args.tags_column, label_names=args.label_names, skip_empty=args.skip_empty,
    )


def _add_training_options(parser: argparse.ArgumentParser, defaults: run.TrainOptions) -> None:
    parser.add_argument("--epochs", type=float, default=defaults.epochs, help="training epochs")
    parser.add_argument("--learning-rate", "--lr", type=float, default=defaults.learning_rate,
                        help="peak learning rate (AdamW, linear warm-up and decay)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="examples per optimizer step")
    parser.add_argument("--max-length", type=int, default=defaults.max_length, help="tokens per example")
    parser.add_argument("--patience", type=int, default=defaults.patience,
                        help="stop after this many epochs without a better dev score")
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps,
                        help="stop after this many optimizer steps (-1: train for --epochs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _training_options(args: argparse.Namespace) -> dict:
    return dict(
        rank=args.rank, epochs=args.epochs, learning_rate=args.learning_rate, batch_size=args.batch_size,
        max_length=args.max_length, patience=args.patience, max_steps=args.max_steps, progress=not args.no_progress,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # peft 0.21 calls this deprecated transformers method for every PeftModel; nothing a user can act on
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    try:
        return args.handler(args)
    except INPUT_ERRORS as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{PROGRAM} {args.command}: error: {message}", file=sys.stderr)
        return USAGE_ERROR


def _shots(value: str) -> Optional[int]:
    if value.lower() == "all":
        return None
    try:
        shots = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {value!r}") from None
    if shots < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {value!r}")
    return shots


def _train(args: argparse.Namespace) -> int:
    metrics = run.train(
        args.model, args.data, args.output_dir, method=args.method, shots=args.shots, seed=args.seed,
        missing_rate=args.missing_rate, use_um=args.use_um, use_ema=args.use_ema, **_training_options(args),
        **_data_options(args),
    )
    print(f"{metrics['method']} on {metrics['data']} ({metrics['sizes']['train']} training examples, "
          f"{metrics['timings']['total_seconds']:.0f} s). Test split ({metrics['sizes']['test']} examples):")
    print(_metrics_table(metrics["test"]))
    output_dir = Path(args.output_dir)
    print(f"Saved adapter, {run.METRICS_NAME} and {run.RELIABILITY_NAME} to {output_dir}/")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .experiments.compare import compare

    compare(
        args.methods, args.data, args.shots, args.seeds, model=args.model, output_dir=args.output_dir,
        dev_size=args.dev_size, test_size=args.test_size, **_training_options(args), **_data_options(args),
    )
    table = Path(args.output_dir) / "comparison.md"
    print(table.read_text(encoding="utf-8"))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    _quiet_transformers()
    result = run.evaluate(
        args.adapter, args.data, split=args.split, missing_rate=args.missing_rate, seed=args.seed,
        batch_size=args.batch_size, progress=not args.no_progress, reliability_path=args.reliability,
        **_data_options(args),
    )
    print(f"{args.adapter} on {args.data} ({args.split}, {result['examples']} examples):")
    print(_metrics_table(result["metrics"]))
    if args.output is not None:
        run.write_json(args.output, result)
    return 0


def _predict(args: argparse.Namespace) -> int:
    _quiet_transformers()
    results = run.predict(args.adapter, args.texts)
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
        return 0
    if "words" not in results[0]:
        rows = [[r["label"], *(_number(r[c]) for c in UNCERTAINTY_COLUMNS), _shorten(r["text"])] for r in results]
        print(_table(["label", *UNCERTAINTY_COLUMNS, "text"], rows))
        return 0
    for number, result in enumerate(results, start=1):
        if number > 1:
            print()
        print(f"[{number}] {result['text']}")
        rows = [[w["word"], w["label"] or "-", *(_number(w[c]) for c in UNCERTAINTY_COLUMNS)] for w in result["words"]]
        print(_table(["word", "label", *UNCERTAINTY_COLUMNS], rows))
    return 0


def _quiet_transformers() -> None:
    """Loading a saved run re-creates the head before the adapter fills it: transformers' report of new weights is
    true but misleading there, and its loading bar only clutters the output."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _metrics_table(metrics: dict) -> str:
    rows = [[name, _number(metrics[name])] for name in SUMMARY_METRICS if name in metrics]
    return _table(["metric", "value"], rows)


def _number(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


def _shorten(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned, text left-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    numeric = [all(_is_number(row[i]) for row in rows) for i in range(len(header))]

    def line(cells):
        return "  ".join(
            (str(cell).rjust(width) if is_number else str(cell).ljust(width))
            for cell, width, is_number in zip(cells, widths, numeric)
        ).rstrip()

    return "\n".join([line(header), *(line(row) for row in rows)])


def _is_number(cell: str) -> bool:
    return cell == "-" or cell.replace(".", "", 1).isdigit()


if __name__ == "__main__":
    sys.exit(main())
