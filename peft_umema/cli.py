"""`peft-umema`: train, evaluate and predict with UMEMA adapters from the command line.

`peft-umema train` with no arguments runs the offline demo (MiniLM on BBC News).

Exit status: 0 done; 2 a problem with the input (a bad option value, a missing or damaged file, an unknown model),
printed as one line naming what is wrong and the fix; 1 an internal error (a bug), also one line; `compare` exits
with 1 when a method failed on every seed, after writing the table of what succeeded. `--debug` (or
PEFT_UMEMA_DEBUG=1) shows the traceback instead. Options are checked before any work starts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tarfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from .experiments import checks
from .experiments import runs as run
from .experiments.methods import METHODS

PROGRAM = "peft-umema"
USAGE_ERROR = 2
INTERNAL_ERROR = 1
INTERRUPTED = 130
DEBUG_ENV = "PEFT_UMEMA_DEBUG"
# Errors of the user's input or environment (OSError: files, folders, permissions, the network); anything else is
# a bug. Either way one line is printed, unless --debug asks for the traceback.
INPUT_ERRORS = (OSError, ValueError, ModuleNotFoundError, tarfile.TarError, EOFError)
UNCERTAINTY_COLUMNS = ("probability", "confidence", "aleatoric", "epistemic")
SUMMARY_METRICS = ("accuracy", "macro_f1", "precision", "recall", "f1", "ece", "nll", "brier", "auroc_error", "aurc",
                   "um_confidence_ece", "um_confidence_auroc_error", "um_confidence_aurc")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROGRAM, description="LoRA + Uncertainty Modeling + External Memory Augmentation (UMEMA) adapters."
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    defaults = run.TrainOptions()

    train = commands.add_parser(
        "train",
        help="fine-tune a backbone and save the run (no arguments: the offline MiniLM / BBC News demo)",
        description="Fine-tune a backbone, keep the best epoch on dev, score the test split, and write the adapter, "
        "metrics.json and reliability.png to --output-dir.",
        formatter_class=_DefaultsHelpFormatter,
    )
    _add_model_and_data(train, defaults)
    train.add_argument("--output-dir", default=run.DEFAULT_OUTPUT_DIR, help="run folder to write")
    train.add_argument("--method", default="umema", choices=sorted(METHODS),
                       help="; ".join(f"{name}: {method.description}" for name, method in sorted(METHODS.items())))
    train.add_argument("--shots", type=_shots, default=run.DEFAULT_SHOTS,
                       help="train on this many examples (seeded, stratified); 'all' for the whole split")
    train.add_argument("--seed", type=seed_value, default=0, help="seeds the subset, initialisation and data order")
    train.add_argument("--use-um", action=argparse.BooleanOptionalAction, default=defaults.use_um,
                       help="Uncertainty Modeling (umema method)")
    train.add_argument("--use-ema", action=argparse.BooleanOptionalAction, default=defaults.use_ema,
                       help="External Memory Augmentation (umema method)")
    train.add_argument("--missing-rate", type=fraction_value, default=0.0,
                       help="drop this fraction of the words of every example (missing-information study)")
    _add_evaluation_subsets(train)
    _add_training_options(train, defaults)
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser(
        "evaluate", help="score a saved run on a data set",
        description="Score a run folder written by `train` on a split of DATA (labels matched by name).",
    )
    evaluate.add_argument("adapter", metavar="ADAPTER", help="run folder written by `peft-umema train`")
    evaluate.add_argument("data", metavar="DATA", help="benchmark name, local path, or hub data set")
    evaluate.add_argument("--split", default="test", help="split to score (default: test)")
    evaluate.add_argument("--missing-rate", type=fraction_value, default=0.0,
                          help="drop this fraction of the words of every example first (default: 0)")
    evaluate.add_argument("--seed", type=seed_value, default=0, help="seed of the dropped words (default: 0)")
    evaluate.add_argument("--batch-size", type=positive_int, default=32)
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
        formatter_class=_DefaultsHelpFormatter,
    )
    _add_model_and_data(compare, defaults)
    compare.add_argument("--methods", nargs="+", default=sorted(METHODS), choices=sorted(METHODS),
                         metavar="METHOD", help=f"methods to compare, from: {', '.join(sorted(METHODS))}")
    compare.add_argument("--shots", type=_shots, default=200, help="training examples per seed; 'all' for all")
    compare.add_argument("--seeds", nargs="+", type=seed_value, default=[0, 1, 2],
                         help="one run of every method per seed")
    compare.add_argument("--output-dir", default="umema-comparison", help="folder for the table and diagrams")
    _add_evaluation_subsets(compare)
    _add_training_options(compare, defaults)
    compare.set_defaults(handler=_compare)
    _add_reproduce(commands)
    for command in commands.choices.values():  # `peft-umema train ... --debug` as well as `peft-umema --debug train`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help=f"show the traceback of an error (or set {DEBUG_ENV}=1)")
    return parser


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except an unset one (None), whose help says what unset means."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the option and where help is (argparse prints the whole usage first)."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _add_reproduce(commands) -> None:
    """`peft-umema reproduce`: the paper's evaluation as a resumable grid (options in experiments/reproduce.py)."""
    from .experiments import reproduce

    parser = commands.add_parser(
        "reproduce", help="run the paper's studies as a resumable grid of cells, or rebuild their report",
        description="Run the paper's section-4 studies (main, ablation, lr, missing, calibration, overhead) as one "
        "run folder per cell (finished cells are skipped, a killed cell is redone), then write results.md, figures "
        "and one JSON per study. --report rebuilds them from the run folders alone.",
        formatter_class=_DefaultsHelpFormatter,
    )
    reproduce.add_arguments(parser)
    parser.set_defaults(handler=reproduce.run_from_args)


def _add_evaluation_subsets(parser: argparse.ArgumentParser) -> None:
    """--dev-size / --test-size: a fixed seeded subset of the dev / test split (the same for every seed)."""
    parser.add_argument("--dev-size", type=positive_int,
                        help="pick the epoch and fit calibration on a fixed seeded subset of this many dev examples "
                        "(default: all)")
    parser.add_argument("--test-size", type=positive_int,
                        help="score on a fixed seeded subset of this many test examples (default: all)")


def _add_model_and_data(parser: argparse.ArgumentParser, defaults: run.TrainOptions) -> None:
    parser.add_argument("--model", default=run.DEFAULT_MODEL, help="backbone: minilm, smollm2-135m, hub name or folder")
    parser.add_argument("--data", default=run.DEFAULT_DATA,
                        help="benchmark name (20newsgroups, semeval2010_task8, wnut17, ploner[:domain], wnut16_demo, "
                        "bbc_news_demo), path of your data (CSV, TSV, JSON, JSON lines, Parquet or CoNLL file, or a "
                        "folder of train/dev/test files), or hub data set")
    parser.add_argument("--rank", type=positive_int, default=defaults.rank, help="LoRA rank")
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
    parser.add_argument("--epochs", type=epochs_value, default=defaults.epochs, help="training epochs")
    parser.add_argument("--learning-rate", "--lr", type=learning_rate_value, default=defaults.learning_rate,
                        help="peak learning rate (AdamW, linear warm-up and decay); at most 1")
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                        help="examples per optimizer step")
    parser.add_argument("--max-length", type=positive_int, default=defaults.max_length,
                        help="tokens per example, at most the backbone's positions (max_position_embeddings)")
    parser.add_argument("--patience", type=positive_int, default=defaults.patience,
                        help="stop after this many epochs without a better dev score")
    parser.add_argument("--max-steps", type=max_steps_value, default=defaults.max_steps,
                        help="stop after this many optimizer steps (-1: train for --epochs)")
    parser.add_argument("--target-modules", nargs="+", default=[defaults.target_modules], metavar="NAME",
                        help="module names that get LoRA (e.g. q_proj v_proj, or c_attn for GPT-2); 'all-linear' = "
                        "every linear layer but the head (default)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    quantization = parser.add_mutually_exclusive_group()
    quantization.add_argument("--load-in-4bit", action="store_true",
                              help="QLoRA: load the backbone's linear layers in 4-bit NF4 (bitsandbytes); LoRA, UM, "
                              "EMA and the memory stay in full precision")
    quantization.add_argument("--load-in-8bit", action="store_true",
                              help="load the backbone's linear layers in 8-bit (bitsandbytes LLM.int8())")


def _training_options(args: argparse.Namespace) -> dict:
    return dict(
        rank=args.rank, epochs=args.epochs, learning_rate=args.learning_rate, batch_size=args.batch_size,
        max_length=args.max_length, patience=args.patience, max_steps=args.max_steps, progress=not args.no_progress,
        load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit,
        target_modules=args.target_modules[0] if args.target_modules == ["all-linear"] else list(args.target_modules),
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; returns its exit status (usage errors exit with 2 from argparse, as SystemExit)."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")
    args.debug = debug
    # peft 0.21 calls this deprecated transformers method for every PeftModel; nothing a user can act on
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{PROGRAM} {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as error:
        if debug:
            raise
        code, message = explain(error)
        kind = "error" if code == USAGE_ERROR else "internal error"
        print(f"{PROGRAM} {args.command}: {kind}: {message}", file=sys.stderr)
        return code


def explain(error: BaseException) -> tuple[int, str]:
    """(exit status, one line) for an error that reached the command line."""
    text = checks.one_line(error) or type(error).__name__
    if _out_of_memory(error):
        return USAGE_ERROR, (
            f"out of memory ({text}); lower --batch-size or --max-length, or choose a smaller --model."
        )
    if isinstance(error, INPUT_ERRORS) or type(error).__name__ == "SafetensorError":
        filename = getattr(error, "filename", None)
        if filename is not None and os.fspath(filename) not in text:
            text = f"{os.fspath(filename)}: {text}"
        return USAGE_ERROR, text
    return INTERNAL_ERROR, (
        f"{type(error).__name__}: {text} -- this is a bug in peft_umema or a library it uses; run the command again "
        "with --debug for the traceback, and report it."
    )


def _out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(error).lower()


def _int_option(text: str, what: str, *, minimum: int, maximum: Optional[int] = None, also: tuple = ()) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value not in also and (value < minimum or (maximum is not None and value > maximum)):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _int_option(text, "a positive integer", minimum=1)


def seed_value(text: str) -> int:
    return _int_option(text, f"a seed, an integer from 0 to {checks.MAX_SEED}", minimum=0, maximum=checks.MAX_SEED)


def max_steps_value(text: str) -> int:
    return _int_option(text, "a positive number of steps, or -1 to train for --epochs", minimum=1, also=(-1,))


def _float_option(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def epochs_value(text: str) -> float:
    value = _float_option(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number of epochs > 0, got {text!r}")
    return value


def learning_rate_value(text: str) -> float:
    value = _float_option(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite learning rate > 0 (e.g. 1e-3), got {text!r}")
    if value > checks.MAX_LEARNING_RATE:
        raise argparse.ArgumentTypeError(
            f"{text} is above {checks.MAX_LEARNING_RATE:g}, where training diverges; LoRA uses 1e-5 to 1e-2, e.g. 1e-3"
        )
    return value


def fraction_value(text: str) -> float:
    value = _float_option(text)
    if not 0 <= value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}")
    return value


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


def check_training_command(args: argparse.Namespace) -> None:
    """What `train` and `compare` can check before loading any data: the output folder, and the backbone with the
    options it bounds (--max-length by its positions, --rank by its hidden size)."""
    checks.check_output_dir(args.output_dir, "--output-dir")
    backbone = checks.check_backbone(args.model, "--model")
    checks.check_max_length(args.max_length, backbone, "--max-length")
    checks.check_rank(args.rank, backbone, "--rank")


def _train(args: argparse.Namespace) -> int:
    check_training_command(args)
    metrics = run.train(
        args.model, args.data, args.output_dir, method=args.method, shots=args.shots, seed=args.seed,
        missing_rate=args.missing_rate, use_um=args.use_um, use_ema=args.use_ema, dev_size=args.dev_size,
        test_size=args.test_size, **_training_options(args), **_data_options(args),
    )
    print(f"{metrics['method']} on {metrics['data']} ({metrics['sizes']['train']} training examples, "
          f"{metrics['timings']['total_seconds']:.0f} s). Test split ({metrics['sizes']['test']} examples):")
    print(_metrics_table(metrics["test"]))
    output_dir = Path(args.output_dir)
    print(f"Saved adapter, {run.METRICS_NAME} and {run.RELIABILITY_NAME} to {output_dir}/")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .experiments.compare import compare

    check_training_command(args)
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds repeat: {args.seeds}; give distinct seeds.")
    summary = compare(
        args.methods, args.data, args.shots, args.seeds, model=args.model, output_dir=args.output_dir,
        dev_size=args.dev_size, test_size=args.test_size, raise_errors=args.debug, **_training_options(args),
        **_data_options(args),
    )
    table = Path(args.output_dir) / "comparison.md"
    print(table.read_text(encoding="utf-8"))
    return report_failed_runs(summary, "compare", table)


def report_failed_runs(summary: Sequence[dict], command: str, table: Path) -> int:
    """Print every failed run (method, seed, why) to stderr; exit status 1 if a method failed on every seed.

    `summary` holds one row per method with `seeds` (how many succeeded) and `errors` ({seed, error} per failure),
    as `compare` returns it.
    """
    failed_everywhere = []
    for row in summary:
        for failure in row.get("errors", []):
            print(f"{PROGRAM} {command}: {row['method']} failed on seed {failure['seed']}: "
                  f"{checks.one_line(failure['error'])}", file=sys.stderr)
        if row.get("errors") and not row.get("seeds"):
            failed_everywhere.append(row["method"])
    if not failed_everywhere:
        return 0
    print(f"{PROGRAM} {command}: error: {', '.join(failed_everywhere)} failed on every seed, so {table} holds only "
          "the methods that succeeded; fix the cause above and run again (--debug stops at the first failure with "
          "its traceback).", file=sys.stderr)
    return INTERNAL_ERROR


def _evaluate(args: argparse.Namespace) -> int:
    if args.output is not None:
        checks.check_output_file(args.output, "--output")
    if args.reliability is not None:
        checks.check_output_file(args.reliability, "--reliability", checks.IMAGE_SUFFIXES)
    _quiet_transformers()
    result = run.evaluate(
        args.adapter, args.data, split=args.split, missing_rate=args.missing_rate, seed=args.seed,
        batch_size=args.batch_size, progress=not args.no_progress, reliability_path=args.reliability,
        **_data_options(args),
    )
    print(f"{args.adapter} on {args.data} ({args.split}, {result['examples']} examples):")
    print(_metrics_table(result["metrics"]))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
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
