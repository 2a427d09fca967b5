"""A table of bad inputs: what a user might pass, the error it must give, and a phrase of that error's message.

Every table is a list of case tuples, so that a new row is one line; the tests below run each row.

* `CONFIG_CASES`, `TRAIN_OPTION_CASES`: wrong values of `UMEMAConfig(...)` / `TrainOptions(...)`.
* `CLI_CASES`: command lines; each must exit with its status and print exactly one `peft-umema ...: error:` line on
  stderr (naming the option or file) and no traceback. `{backbone}`, `{data}`, `{run}` and `{tmp}` stand for a tiny
  backbone folder, a small CoNLL file, a trained run folder and an empty folder.
* `BACKBONE_CASES`: damaged backbone folders (made from the tiny one by a function), passed as `train --model`.
* `SAVED_FILE_CASES`: damaged copies of the trained run folder, passed to `peft-umema predict` and `run.predict`.
* `DATA_CASES`: bad data files, passed as `train --data`.
* `API_CASES`: bad arguments of the Python API (`train`, `evaluate`, `predict`, `compare`, `load_backbone`).

Most rows fail in validation, before any model is loaded: the whole file runs in well under two minutes on 2 CPUs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from peft_umema import UMEMAConfig
from peft_umema.cli import main, report_failed_runs
from peft_umema.experiments import runs as run
from peft_umema.experiments.backbones import load_backbone, resolve_backbone
from peft_umema.experiments.compare import compare
from peft_umema.experiments.methods import METHODS, LoRAMethod, TrainOptions

POSITIONS = 64
HIDDEN = 32
TRAIN = ["--shots", "8", "--epochs", "1", "--batch-size", "4", "--max-length", "16", "--no-progress"]


# ----------------------------------------------------------------------------------------------------------------
# Fixtures: one tiny backbone, one small data file, one trained run, shared by the whole module
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad-inputs")
    backbone = root / "backbone"
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone("minilm"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=HIDDEN, num_hidden_layers=4,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=POSITIONS)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)

    names = {"PER": ["Anna", "Bruno", "Clara", "Dmitri"], "LOC": ["Paris", "Rome", "Oslo", "Lima"]}
    sentences = [f"{names[kind][i % 4]}\tB-{kind}\nwent\tO\nhome\tO\n" for i in range(30) for kind in names]
    data = root / "ner.txt"
    data.write_text("\n".join(sentences), encoding="utf-8")

    trained = root / "run"
    code = main(["train", "--model", str(backbone), "--data", str(data), "--output-dir", str(trained), *TRAIN])
    assert code == 0
    empty = root / "empty"
    empty.mkdir()
    return {"backbone": str(backbone), "data": str(data), "run": str(trained), "tmp": str(empty), "root": str(root)}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and the one error line (argparse exits via SystemExit, the commands return their status)."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("peft-umema") and ": error: " in line]
    assert len(errors) == 1, err
    return code, errors[0]


# ----------------------------------------------------------------------------------------------------------------
# UMEMAConfig and TrainOptions
# ----------------------------------------------------------------------------------------------------------------

# (UMEMAConfig keyword arguments besides task_type="SEQ_CLS", exception, phrase of the message)
CONFIG_CASES = [
    ({"task_type": "CAUSAL_LM"}, ValueError, "task_type='CAUSAL_LM') is not supported"),
    ({"task_type": None}, ValueError, "task_type=None) is not supported"),
    ({"memory_size": 0}, ValueError, "memory_size=0"),
    ({"memory_size": -4}, ValueError, "memory_size=-4"),
    ({"memory_size": 1.5}, ValueError, "memory_size=1.5"),
    ({"memory_size": True}, ValueError, "memory_size=True"),
    ({"num_tasks": 0}, ValueError, "num_tasks=0"),
    ({"propagation_rank": 0}, ValueError, "propagation_rank=0"),
    ({"uncertainty_memory_dim": -3}, ValueError, "uncertainty_memory_dim=-3"),
    ({"propagation_layers": -1}, ValueError, "propagation_layers=-1"),
    ({"guidance_dim": 0}, ValueError, "guidance_dim=0"),
    ({"quantization_levels": 1}, ValueError, "quantization_levels=1"),
    ({"min_temperature": 0.0}, ValueError, "min_temperature=0.0"),
    ({"min_temperature": 1.0}, ValueError, "min_temperature=1.0"),
    ({"min_temperature": float("nan")}, ValueError, "min_temperature=nan"),
    ({"retrieval_temperature": 0.0}, ValueError, "retrieval_temperature=0.0"),
    ({"retrieval_temperature": float("inf")}, ValueError, "retrieval_temperature=inf"),
    ({"confidence_loss_weight": -1.0}, ValueError, "confidence_loss_weight=-1.0"),
    ({"confidence_loss_weight": float("nan")}, ValueError, "confidence_loss_weight=nan"),
    ({"gate_bias_init": float("nan")}, ValueError, "gate_bias_init=nan"),
    ({"logit_scale": 0.0}, ValueError, "logit_scale=0.0"),
    ({"logit_scale": float("inf")}, ValueError, "logit_scale=inf"),
    ({"logit_scale": True}, ValueError, "logit_scale=True"),
    ({"context_pooling": "max"}, ValueError, "context_pooling='max'"),
    ({"use_dora": True}, ValueError, "use_dora=True"),
]


@pytest.mark.parametrize(("kwargs", "error", "phrase"), CONFIG_CASES, ids=[str(c[0]) for c in CONFIG_CASES])
def test_config(kwargs, error, phrase):
    with pytest.raises(error) as raised:
        UMEMAConfig(**{"task_type": "SEQ_CLS", **kwargs})
    assert phrase in str(raised.value)


# (TrainOptions keyword arguments, phrase): all ValueError
TRAIN_OPTION_CASES = [
    ({"rank": 0}, "rank must be a positive integer"),
    ({"rank": True}, "rank must be a positive integer"),
    ({"rank": 2.0}, "rank must be a positive integer"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"max_length": -1}, "max_length must be a positive integer"),
    ({"patience": 0}, "patience must be a positive integer"),
    ({"epochs": 0}, "epochs must be a finite number > 0"),
    ({"epochs": float("inf")}, "epochs must be a finite number > 0"),
    ({"epochs": float("nan")}, "epochs must be a finite number > 0"),
    ({"learning_rate": 0}, "learning_rate=0"),
    ({"learning_rate": -1e-3}, "learning_rate=-0.001"),
    ({"learning_rate": float("inf")}, "learning_rate=inf"),
    ({"learning_rate": float("nan")}, "learning_rate=nan"),
    ({"learning_rate": 1e10}, "above 1"),
    ({"max_steps": 0}, "max_steps must be a positive integer, or -1"),
    ({"max_steps": -5}, "max_steps must be a positive integer, or -1"),
    ({"max_steps": 2.5}, "max_steps must be a positive integer, or -1"),
    ({"warmup_ratio": 1.0}, "warmup_ratio must be in [0, 1)"),
    ({"warmup_ratio": float("nan")}, "warmup_ratio must be in [0, 1)"),
    ({"weight_decay": -0.1}, "weight_decay must be a finite number >= 0"),
    ({"max_grad_norm": float("inf")}, "max_grad_norm must be a finite number >= 0"),
    ({"target_modules": []}, "target_modules must be"),
    ({"target_modules": 5}, "target_modules must be"),
]


@pytest.mark.parametrize(("kwargs", "phrase"), TRAIN_OPTION_CASES, ids=[str(c[0]) for c in TRAIN_OPTION_CASES])
def test_train_options(kwargs, phrase):
    with pytest.raises(ValueError) as raised:
        TrainOptions(**kwargs)
    assert phrase in str(raised.value)


# ----------------------------------------------------------------------------------------------------------------
# Command-line options
# ----------------------------------------------------------------------------------------------------------------

T = ["train", "--model", "{backbone}", "--data", "{data}", "--output-dir", "{tmp}/out", *TRAIN]
C = ["compare", "--methods", "lora", "--model", "{backbone}", "--data", "{data}", "--output-dir", "{tmp}/cmp", *TRAIN]
E = ["evaluate", "{run}", "{data}", "--no-progress"]

# (id, argv, exit status, phrase of the error line); later options override earlier ones
CLI_CASES = [
    ("seed-negative", [*T, "--seed", "-1"], 2, "argument --seed: expected a seed"),
    ("seed-text", [*T, "--seed", "abc"], 2, "argument --seed"),
    ("seed-too-big", [*T, "--seed", str(2**32)], 2, "argument --seed"),
    ("lr-inf", [*T, "--lr", "inf"], 2, "argument --learning-rate/--lr: expected a finite learning rate"),
    ("lr-nan", [*T, "--lr", "nan"], 2, "expected a finite learning rate"),
    ("lr-zero", [*T, "--lr", "0"], 2, "expected a finite learning rate > 0"),
    ("lr-negative", [*T, "--learning-rate=-1e-3"], 2, "expected a finite learning rate > 0"),
    ("lr-absurd", [*T, "--lr", "1e10"], 2, "1e10 is above 1"),
    ("lr-text", [*T, "--lr", "fast"], 2, "argument --learning-rate/--lr: expected a number, got 'fast'"),
    ("max-steps-negative", [*T, "--max-steps", "-5"], 2, "argument --max-steps"),
    ("max-steps-zero", [*T, "--max-steps", "0"], 2, "or -1 to train for --epochs"),
    ("epochs-zero", [*T, "--epochs", "0"], 2, "argument --epochs"),
    ("epochs-inf", [*T, "--epochs", "inf"], 2, "argument --epochs: expected a finite number"),
    ("epochs-nan", [*T, "--epochs", "nan"], 2, "argument --epochs"),
    ("epochs-negative", [*T, "--epochs", "-2"], 2, "argument --epochs"),
    ("batch-size-zero", [*T, "--batch-size", "0"], 2, "argument --batch-size: expected a positive integer"),
    ("batch-size-float", [*T, "--batch-size", "2.5"], 2, "argument --batch-size"),
    ("max-length-zero", [*T, "--max-length", "0"], 2, "argument --max-length"),
    ("max-length-negative", [*T, "--max-length", "-8"], 2, "argument --max-length"),
    ("max-length-over-positions", [*T, "--max-length", "100000"], 2,
     f"--max-length 100000 exceeds the {POSITIONS} positions"),
    ("max-length-one-over", [*T, "--max-length", str(POSITIONS + 1)], 2, "max_position_embeddings"),
    ("patience-zero", [*T, "--patience", "0"], 2, "argument --patience"),
    ("rank-zero", [*T, "--rank", "0"], 2, "argument --rank"),
    ("rank-negative", [*T, "--rank", "-4"], 2, "argument --rank"),
    ("rank-over-hidden", [*T, "--rank", "1000"], 2, f"--rank 1000 exceeds the hidden size {HIDDEN}"),
    ("shots-zero", [*T, "--shots", "0"], 2, "argument --shots"),
    ("shots-text", [*T, "--shots", "many"], 2, "argument --shots"),
    ("missing-rate-over-1", [*T, "--missing-rate", "1.5"], 2, "argument --missing-rate"),
    ("missing-rate-negative", [*T, "--missing-rate", "-0.1"], 2, "argument --missing-rate"),
    ("missing-rate-nan", [*T, "--missing-rate", "nan"], 2, "argument --missing-rate"),
    ("method-unknown", [*T, "--method", "nonexistent"], 2, "argument --method: invalid choice: 'nonexistent'"),
    ("option-unknown", [*T, "--bogus-option"], 2, "unrecognized arguments: --bogus-option"),
    ("output-dir-is-file", [*T, "--output-dir", "{data}"], 2, "is a file, not a folder"),
    ("output-dir-under-file", [*T, "--output-dir", "{data}/run"], 2, "is a file, so no folder can be made"),
    ("output-dir-empty", [*T, "--output-dir", ""], 2, "--output-dir is empty"),
    ("model-empty", [*T, "--model", ""], 2, "--model is empty"),
    ("evaluate-batch-size", [*E, "--batch-size", "0"], 2, "argument --batch-size"),
    ("evaluate-seed", [*E, "--seed", "-2"], 2, "argument --seed"),
    ("evaluate-missing-rate", [*E, "--missing-rate", "2"], 2, "argument --missing-rate"),
    ("evaluate-reliability-suffix", [*E, "--reliability", "{tmp}/figure.txt"], 2, "cannot write a .txt file"),
    ("evaluate-reliability-folder", [*E, "--reliability", "{tmp}"], 2, "is a folder; pass a file name"),
    ("evaluate-output-under-file", [*E, "--output", "{data}/result.json"], 2, "is a file, so no file can be made"),
    ("evaluate-output-folder", [*E, "--output", "{tmp}"], 2, "--output {tmp} is a folder"),
    ("evaluate-missing-run", ["evaluate", "{tmp}/missing", "{data}"], 2, "not found"),
    ("evaluate-no-run-info", ["evaluate", "{tmp}", "{data}"], 2, "has no umema_run.json"),
    ("evaluate-no-arguments", ["evaluate"], 2, "the following arguments are required: ADAPTER, DATA"),
    ("evaluate-unknown-split", [*E, "--split", "nosuch"], 2, "has no split 'nosuch'"),
    ("predict-empty-text", ["predict", "{run}", ""], 2, "Text 1 is empty"),
    ("predict-blank-text", ["predict", "{run}", "fine", "   "], 2, "Text 2 is empty"),
    ("predict-missing-run", ["predict", "{tmp}/missing", "some text"], 2, "not found"),
    ("predict-no-text", ["predict", "{run}"], 2, "the following arguments are required: TEXT"),
    ("compare-dev-size-zero", [*C, "--dev-size", "0"], 2, "argument --dev-size: expected a positive integer"),
    ("compare-test-size-negative", [*C, "--test-size", "-3"], 2, "argument --test-size"),
    ("compare-seed-negative", [*C, "--seeds", "0", "-1"], 2, "argument --seeds"),
    ("compare-seeds-repeat", [*C, "--seeds", "1", "1"], 2, "--seeds repeat"),
    ("compare-method-unknown", [*C, "--methods", "lora", "nope"], 2, "argument --methods: invalid choice: 'nope'"),
    ("compare-shots-zero", [*C, "--shots", "0"], 2, "argument --shots"),
    ("compare-lr-inf", [*C, "--lr", "inf"], 2, "argument --learning-rate/--lr"),
    ("compare-max-length", [*C, "--max-length", "4096"], 2, "--max-length 4096 exceeds"),
    ("compare-output-dir-is-file", [*C, "--output-dir", "{data}"], 2, "is a file, not a folder"),
    ("no-command", [], 2, "the following arguments are required: COMMAND"),
    ("unknown-command", ["fly"], 2, "invalid choice: 'fly'"),
]


@pytest.mark.parametrize(("argv", "status", "phrase"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli(paths, capsys, argv, status, phrase):
    code, line = run_cli([arg.format(**paths) for arg in argv], capsys)
    assert code == status
    assert phrase.format(**paths) in line


# ----------------------------------------------------------------------------------------------------------------
# Backbones
# ----------------------------------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])


def _remove(*names):
    def change(folder: Path) -> None:
        for name in names:
            (folder / name).unlink()

    return change


def _remove_tokenizer(folder: Path) -> None:
    for pattern in ("tokenizer*", "vocab*", "special_tokens_map.json"):
        for path in folder.glob(pattern):
            path.unlink()


def _write(name: str, content: str | bytes):
    def change(folder: Path) -> None:
        path = folder / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)

    return change


# (id, what to do to a copy of the tiny backbone folder, or a --model value, phrase)
BACKBONE_CASES = [
    ("no-config", _remove("config.json"), "has no config.json, so it is not a transformers model folder"),
    ("config-not-json", _write("config.json", "{model_type: bert"), "config.json is not valid JSON"),
    ("config-binary", _write("config.json", b"\xff\xfe\x00garbage"), "config.json is not a text file"),
    ("config-no-model-type", _write("config.json", "{}"), "config.json is not a usable transformers config"),
    ("config-unknown-type", _write("config.json", '{"model_type": "nosuchnet"}'), "not a usable transformers config"),
    ("no-weights", _remove("model.safetensors"), "has no weights"),
    ("weights-truncated", lambda folder: _truncate(folder / "model.safetensors"), "model.safetensors is damaged"),
    ("weights-random", _write("model.safetensors", os.urandom(4096)), "model.safetensors is damaged"),
    ("weights-empty", _write("model.safetensors", b""), "model.safetensors is damaged"),
    ("no-tokenizer", lambda folder: _remove_tokenizer(folder), "has no tokenizer files"),
    ("tokenizer-not-json", _write("tokenizer.json", "{"), "Could not load the tokenizer of the backbone"),
    ("tokenizer-empty-vocabulary", lambda folder: (_remove_tokenizer(folder), _write("vocab.txt", "[UNK]\n")(folder)),
     "has no vocabulary"),
    ("empty-folder", lambda folder: [path.unlink() for path in folder.iterdir()], "has no config.json"),
    ("missing-relative-path", "./no/such/model", "--model ./no/such/model: no such folder"),
    ("missing-absolute-path", "/no/such/model/folder", "no such folder"),
    ("unknown-hub-name", "does-not-exist", "not loadable from the Hugging Face Hub"),
    ("unknown-hub-repo", "someone/does-not-exist", "not a backbone name (minilm, smollm2-135m)"),
    ("a-file", "{data}", "is a file; pass the model folder"),
]


@pytest.mark.parametrize(("change", "phrase"), [c[1:] for c in BACKBONE_CASES], ids=[c[0] for c in BACKBONE_CASES])
def test_bad_backbone(paths, capsys, tmp_path, change, phrase):
    if callable(change):
        model = tmp_path / "model"
        shutil.copytree(paths["backbone"], model)
        change(model)
        model = str(model)
    else:
        model = change.format(**paths)
    argv = ["train", "--model", model, "--data", paths["data"], "--output-dir", str(tmp_path / "out"), *TRAIN]
    code, line = run_cli(argv, capsys)
    assert code == 2
    assert phrase in line


# ----------------------------------------------------------------------------------------------------------------
# Saved files of a run folder
# ----------------------------------------------------------------------------------------------------------------


def _edit_json(name: str, **changes):
    def change(folder: Path) -> None:
        path = folder / name
        content = json.loads(path.read_text())
        content.update(changes)
        path.write_text(json.dumps(content))

    return change


def _backbone_moved(folder: Path) -> None:
    _edit_json(run.RUN_INFO_NAME, backbone=str(folder.parent / "moved-backbone"))(folder)


# (id, what to do to a copy of the trained run folder, exception of the Python API, phrase)
SAVED_FILE_CASES = [
    ("weights-truncated", lambda f: _truncate(f / "adapter_model.safetensors"), ValueError,
     "adapter_model.safetensors is damaged"),
    ("weights-random", _write("adapter_model.safetensors", os.urandom(5000)), ValueError,
     "adapter_model.safetensors is damaged"),
    ("weights-empty", _write("adapter_model.safetensors", b""), ValueError, "adapter_model.safetensors is damaged"),
    ("weights-text", _write("adapter_model.safetensors", "not weights\n"), ValueError, "not a complete safetensors"),
    ("adapter-config-not-json", _write("adapter_config.json", "{not json"), ValueError,
     "adapter_config.json is not valid JSON"),
    ("adapter-config-truncated", _write("adapter_config.json", '{"r": 8, "peft_type": "UMEMA"'), ValueError,
     "adapter_config.json is not valid JSON"),
    ("adapter-config-binary", _write("adapter_config.json", b"\x89PNG\r\n\x1a\n\xff"), ValueError,
     "adapter_config.json is not a text file"),
    ("adapter-config-missing", _remove("adapter_config.json"), ValueError, "adapter_config.json"),
    ("weights-missing", _remove("adapter_model.safetensors"), FileNotFoundError, "has no adapter_model.safetensors"),
    ("weights-as-bin", lambda f: (_remove("adapter_model.safetensors")(f), _write("adapter_model.bin", b"x" * 64)(f)),
     FileNotFoundError, "load from safetensors only"),
    ("config-rank-edited", _edit_json("adapter_config.json", r=4), ValueError, "Shape mismatch"),
    ("config-memory-edited", _edit_json("adapter_config.json", memory_size=128), ValueError, "Memory size mismatch"),
    ("config-peft-type-edited", _edit_json("adapter_config.json", peft_type="NOPE"), ValueError,
     "its files do not fit together (KeyError: 'NOPE')"),
    ("run-info-label-dropped", _edit_json(run.RUN_INFO_NAME, label_names=["O", "B-PER", "I-PER", "B-LOC"]),
     ValueError, "Label count mismatch"),
    ("run-info-other-task", _edit_json(run.RUN_INFO_NAME, task_type="SEQ_CLS"), ValueError,
     "The adapter's task_type is 'TOKEN_CLS'"),
    ("run-info-not-json", _write(run.RUN_INFO_NAME, "{"), ValueError, "umema_run.json is not valid JSON"),
    ("run-info-missing", _remove(run.RUN_INFO_NAME), FileNotFoundError, "has no umema_run.json"),
    ("run-info-number", _write(run.RUN_INFO_NAME, "5"), ValueError, "holds a JSON int, not an object"),
    ("run-info-list", _write(run.RUN_INFO_NAME, "[]"), ValueError, "holds a JSON list, not an object"),
    ("run-info-incomplete", _write(run.RUN_INFO_NAME, '{"method": "umema"}'), ValueError, "lacks ['backbone'"),
    ("run-info-task-type", _edit_json(run.RUN_INFO_NAME, task_type="CAUSAL_LM"), ValueError, '"task_type" must be'),
    ("run-info-no-labels", _edit_json(run.RUN_INFO_NAME, label_names=[]), ValueError, '"label_names" must be'),
    ("run-info-labels-string", _edit_json(run.RUN_INFO_NAME, label_names="O,B-PER"), ValueError,
     '"label_names" must be a non-empty list'),
    ("run-info-labels-repeat", _edit_json(run.RUN_INFO_NAME, label_names=["O", "O"]), ValueError,
     '"label_names" repeat'),
    ("run-info-max-length", _edit_json(run.RUN_INFO_NAME, max_length=0), ValueError, '"max_length" must be'),
    ("run-info-max-length-text", _edit_json(run.RUN_INFO_NAME, max_length="64"), ValueError, '"max_length" must be'),
    ("run-info-method", _edit_json(run.RUN_INFO_NAME, method="teleport"), ValueError,
     "umema_run.json: Unknown method 'teleport'"),
    ("run-info-backbone-empty", _edit_json(run.RUN_INFO_NAME, backbone=""), ValueError,
     '"backbone" must be a non-empty string'),
    ("backbone-moved", _backbone_moved, FileNotFoundError, "no longer exists (moved or deleted?)"),
    ("tokenizer-missing", _remove_tokenizer, FileNotFoundError, "has no tokenizer files"),
    ("tokenizer-not-json", _write("tokenizer.json", '{"version": '), ValueError, "tokenizer.json is not valid JSON"),
    ("tokenizer-config-not-json", _write("tokenizer_config.json", "]"), ValueError,
     "tokenizer_config.json is not valid JSON"),
]


def _damaged_run(paths, tmp_path, change) -> Path:
    folder = tmp_path / "run"
    shutil.copytree(paths["run"], folder)
    change(folder)
    return folder


@pytest.mark.parametrize(("change", "error", "phrase"), [c[1:] for c in SAVED_FILE_CASES],
                         ids=[c[0] for c in SAVED_FILE_CASES])
def test_damaged_run_folder_on_the_command_line(paths, capsys, tmp_path, change, error, phrase):
    folder = _damaged_run(paths, tmp_path, change)
    code, line = run_cli(["predict", str(folder), "Anna went home"], capsys)
    assert code == 2
    assert phrase in line


@pytest.mark.parametrize(("change", "error", "phrase"), [c[1:] for c in SAVED_FILE_CASES],
                         ids=[c[0] for c in SAVED_FILE_CASES])
def test_damaged_run_folder_in_python(paths, tmp_path, change, error, phrase):
    folder = _damaged_run(paths, tmp_path, change)
    with pytest.raises(error) as raised:
        run.predict(folder, ["Anna went home"])
    assert phrase in str(raised.value)
    assert "\n" not in str(raised.value).strip()


def test_run_folder_that_is_a_file(paths, capsys):
    code, line = run_cli(["predict", paths["data"], "Anna"], capsys)
    assert code == 2 and "not found" in line


# ----------------------------------------------------------------------------------------------------------------
# Data files
# ----------------------------------------------------------------------------------------------------------------

# (id, file name, content, phrase)
DATA_CASES = [
    ("empty-file", "empty.txt", "", "the file is empty"),
    ("binary-file", "binary.txt", b"\xff\xfe\x00\x9c" * 64, "not valid utf-8 text"),
    ("bad-bio-tag", "tags.txt", "Anna\tB-PER\nwent\tX-BAD\n\n", "X-BAD"),
    ("not-a-tag", "columns.txt", "Anna B-PER extra more\n", "line 1"),
    ("csv-header-only", "header.csv", "text,label\n", "header.csv"),
    ("csv-no-label-column", "nolabel.csv", "a,b\n1,2\n3,4\n", "cannot tell which column holds the labels"),
    ("jsonl-truncated", "broken.jsonl", '{"text": "a", "label": ', "cannot be read as JSON"),
    ("empty-folder", "folder/", None, "Cannot recognise the data"),
]


@pytest.mark.parametrize(("name", "content", "phrase"), [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_data_file(paths, capsys, tmp_path, name, content, phrase):
    data = tmp_path / name
    if content is None:
        data.mkdir()
    elif isinstance(content, bytes):
        data.write_bytes(content)
    else:
        data.write_text(content, encoding="utf-8")
    argv = ["train", "--model", paths["backbone"], "--data", str(data), "--output-dir", str(tmp_path / "out"), *TRAIN]
    code, line = run_cli(argv, capsys)
    assert code == 2
    assert phrase in line


# ----------------------------------------------------------------------------------------------------------------
# The Python API
# ----------------------------------------------------------------------------------------------------------------


def _train(**kwargs):
    def call(paths):
        arguments = {"model": paths["backbone"], "data": paths["data"], "output_dir": f"{paths['tmp']}/api-out",
                     "shots": 8, "epochs": 1, "max_length": 16, "progress": False, **kwargs}
        return run.train(**{key: value.format(**paths) if isinstance(value, str) else value
                            for key, value in arguments.items()})

    return call


def _compare(**kwargs):
    def call(paths):
        arguments = {"methods": ["lora"], "data": paths["data"], "shots": 8, "seeds": [0], "model": paths["backbone"],
                     "output_dir": f"{paths['tmp']}/api-cmp", "max_length": 16, "progress": False, **kwargs}
        return compare(**arguments)

    return call


# (id, call(paths), exception, phrase)
API_CASES = [
    ("train-seed", _train(seed=-1), ValueError, "seed=-1"),
    ("train-seed-float", _train(seed=1.5), ValueError, "seed=1.5: expected an integer"),
    ("train-shots", _train(shots=0), ValueError, "shots=0"),
    ("train-missing-rate", _train(missing_rate=1.5), ValueError, "missing_rate=1.5"),
    ("train-method", _train(method="nope"), ValueError, "Unknown method 'nope'"),
    ("train-unknown-option", _train(learning_speed=3), ValueError, "Unknown training option(s) ['learning_speed']"),
    ("train-lr", _train(learning_rate=float("inf")), ValueError, "learning_rate=inf"),
    ("train-max-length", _train(max_length=100000), ValueError, "max_length=100000 exceeds the 64 positions"),
    ("train-rank", _train(rank=64), ValueError, "rank=64 exceeds the hidden size 32"),
    ("train-model-missing", _train(model="./no/such/model"), FileNotFoundError, "model ./no/such/model: no such"),
    ("train-model-unknown", _train(model="does-not-exist"), FileNotFoundError, "not loadable from the Hugging Face"),
    ("train-output-file", _train(output_dir="{data}"), NotADirectoryError, "is a file, not a folder"),
    ("evaluate-batch-size", lambda p: run.evaluate(p["run"], p["data"], batch_size=0), ValueError, "batch_size=0"),
    ("evaluate-split", lambda p: run.evaluate(p["run"], p["data"], split=""), ValueError, "split=''"),
    ("evaluate-seed", lambda p: run.evaluate(p["run"], p["data"], seed=-3), ValueError, "seed=-3"),
    ("evaluate-missing-rate", lambda p: run.evaluate(p["run"], p["data"], missing_rate=-1), ValueError,
     "missing_rate=-1"),
    ("evaluate-reliability", lambda p: run.evaluate(p["run"], p["data"], reliability_path="r.svg"), ValueError,
     "cannot write a .svg file"),
    ("predict-nothing", lambda p: run.predict(p["run"], []), ValueError, "pass at least one text"),
    ("predict-empty", lambda p: run.predict(p["run"], ["ok", ""]), ValueError, "Text 2 is empty"),
    ("predict-not-text", lambda p: run.predict(p["run"], [3]), ValueError, "Text 1 is empty"),
    ("predict-batch-size", lambda p: run.predict(p["run"], ["x"], batch_size=0), ValueError, "batch_size=0"),
    ("predict-missing-run", lambda p: run.predict(f"{p['tmp']}/none", ["x"]), FileNotFoundError, "not found"),
    ("compare-dev-size", _compare(dev_size=0), ValueError, "dev_size=0"),
    ("compare-test-size", _compare(test_size=-3), ValueError, "test_size=-3"),
    ("compare-seed", _compare(seeds=[-1]), ValueError, "seeds=-1"),
    ("compare-seeds-repeat", _compare(seeds=[0, 0]), ValueError, "Seeds must be distinct"),
    ("compare-no-methods", _compare(methods=[]), ValueError, "at least one method"),
    ("compare-unknown-method", _compare(methods=["nope"]), ValueError, "Unknown method 'nope'"),
    ("compare-max-length", _compare(max_length=65), ValueError, "max_length=65 exceeds"),
    ("load-backbone-task", lambda p: load_backbone(p["backbone"], "CAUSAL_LM", 3), ValueError, "task_type must be"),
    ("load-backbone-labels", lambda p: load_backbone(p["backbone"], "SEQ_CLS", 0), ValueError, "num_labels must be"),
    ("load-backbone-id2label", lambda p: load_backbone(p["backbone"], "SEQ_CLS", 3, id2label=["a"]), ValueError,
     "id2label must name each of the 3 label ids"),
]


@pytest.mark.parametrize(("call", "error", "phrase"), [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_python_api(paths, call, error, phrase):
    with pytest.raises(error) as raised:
        call(paths)
    assert phrase.format(**paths) in str(raised.value)


# ----------------------------------------------------------------------------------------------------------------
# Behaviour around the table
# ----------------------------------------------------------------------------------------------------------------


def test_debug_shows_the_traceback(paths):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        main(["train", "--model", "./no/such/model", "--data", paths["data"], "--debug"])
    with pytest.raises(FileNotFoundError, match="not found"):
        main(["--debug", "predict", f"{paths['tmp']}/none", "x"])


def test_an_internal_error_exits_with_1(monkeypatch, capsys, paths):
    def broken(*args, **kwargs):
        raise TypeError("an argument the code did not expect")

    monkeypatch.setattr(run, "predict", broken)
    capsys.readouterr()
    code = main(["predict", paths["run"], "x"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "internal error: TypeError: an argument the code did not expect" in err and "--debug" in err


class _FailingMethod(LoRAMethod):
    name = "always-fails"
    description = "fails on every seed (for the test)"

    def fit(self, setup):
        raise RuntimeError(f"no luck with seed {setup.seed}")


def test_compare_exits_non_zero_when_a_method_fails_on_every_seed(monkeypatch, paths, capsys, tmp_path):
    monkeypatch.setitem(METHODS, _FailingMethod.name, _FailingMethod())
    output_dir = tmp_path / "comparison"
    capsys.readouterr()
    code = main(["compare", "--methods", "lora", "always-fails", "--model", paths["backbone"], "--data",
                 paths["data"], "--seeds", "0", "1", "--output-dir", str(output_dir), *TRAIN])
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" not in captured.err
    assert "always-fails failed on seed 0: RuntimeError: no luck with seed 0" in captured.err
    assert "always-fails failed on seed 1: RuntimeError: no luck with seed 1" in captured.err
    assert "error: always-fails failed on every seed" in captured.err
    table = (output_dir / "comparison.md").read_text()
    assert "| lora |" in table and table in captured.out  # what succeeded is still written


def test_failed_runs_report():
    table = Path("comparison.md")
    partial = [{"method": "lora", "seeds": 1, "errors": [{"seed": 2, "error": "ValueError: bad\nthing"}]}]
    assert report_failed_runs(partial, "compare", table) == 0
    everywhere = partial + [{"method": "swag", "seeds": 0, "errors": [{"seed": 0, "error": "x"}]}]
    assert report_failed_runs(everywhere, "compare", table) == 1
    assert report_failed_runs([{"method": "lora", "seeds": 2, "errors": []}], "compare", table) == 0


def test_the_table_is_large_enough():
    rows = (CONFIG_CASES, TRAIN_OPTION_CASES, CLI_CASES, BACKBONE_CASES, SAVED_FILE_CASES, DATA_CASES, API_CASES)
    assert sum(len(table) for table in rows) >= 100
