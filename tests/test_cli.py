"""`peft-umema train -> evaluate -> predict` end to end on a tiny random BERT and tiny slices of the real data."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from peft_umema.cli import main
from peft_umema.data.loaders import label_names_of, load_benchmark
from peft_umema.experiments import runs as run
from peft_umema.experiments.backbones import resolve_backbone

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CALIBRATION_KEYS = {"ece", "nll", "brier", "auroc_error", "aurc", "accuracy"}
UM_KEYS = {"um_confidence_ece", "um_confidence_auroc_error", "um_confidence_aurc"}


def save_tiny_backbone(folder: Path) -> Path:
    """A random 2-layer BERT (hidden size 32) with MiniLM's real WordPiece tokenizer: real text, instant steps."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone("minilm"))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_ner_slice(shared_data: Path, path: Path, sentences: int = 200) -> Path:
    """The first sentences of PLONER's CoNLL-03 train file, as a single BIO file (splits are carved from it)."""
    kept, count = [], 0
    for line in (shared_data / "ploner" / "connl03_train.txt").read_text(encoding="utf-8").splitlines():
        kept.append(line)
        if not line.strip():
            count += 1
            if count == sentences:
                break
    path.write_text("\n".join(kept) + "\n", encoding="utf-8")
    return path


def save_relation_slice(shared_data: Path, folder: Path, train_records: int = 120, test_records: int = 60) -> Path:
    """The first records of SemEval-2010 Task 8's train and test files, in the official layout."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, records in (("TRAIN_FILE.TXT", train_records), ("TEST_FILE_FULL.TXT", test_records)):
        lines = (shared_data / "semeval2010_task8" / name).read_bytes().split(b"\n")
        (folder / name).write_bytes(b"\n".join(lines[: 4 * records]) + b"\n")
    return folder


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory) -> str:
    return str(save_tiny_backbone(tmp_path_factory.mktemp("tiny-bert")))


@pytest.fixture(scope="module")
def ner_file(tmp_path_factory) -> str:
    from conftest import SHARED_DATA

    return str(save_ner_slice(SHARED_DATA, tmp_path_factory.mktemp("data") / "ner.txt"))


@pytest.fixture(scope="module")
def ner_run(tiny_backbone, ner_file, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("runs") / "ner"
    code = main([
        "train", "--model", tiny_backbone, "--data", ner_file, "--output-dir", str(output_dir), "--shots", "48",
        "--epochs", "2", "--batch-size", "8", "--max-length", "64", "--learning-rate", "5e-3", "--no-progress",
    ])
    assert code == 0
    return output_dir


def test_train_writes_a_complete_run_folder(ner_run):
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", run.RUN_INFO_NAME):
        assert (ner_run / name).is_file(), name
    assert not (ner_run / run.CHECKPOINTS_NAME).exists()
    assert (ner_run / run.RELIABILITY_NAME).read_bytes().startswith(PNG_SIGNATURE)

    metrics = json.loads((ner_run / run.METRICS_NAME).read_text())
    assert {"precision", "recall", "f1"} | CALIBRATION_KEYS | UM_KEYS <= set(metrics["test"])
    assert "f1" in metrics["dev"] and metrics["dev"]["epoch"] in (1, 2)
    assert metrics["sizes"]["train"] == 48 and metrics["sizes"]["test"] == 40
    assert metrics["method"] == "umema" and metrics["task_type"] == "TOKEN_CLS" and metrics["seed"] == 0
    assert metrics["config"]["rank"] == 8 and metrics["config"]["use_um"] and metrics["config"]["use_ema"]
    assert 0 < metrics["trainable_parameters"] < metrics["total_parameters"]
    assert {"fit_seconds", "test_seconds", "total_seconds"} <= set(metrics["timings"])
    assert metrics["label_names"][0] == "O" and "B-PER" in metrics["label_names"]

    info = json.loads((ner_run / run.RUN_INFO_NAME).read_text())
    assert Path(info["backbone"]).is_absolute() and info["max_length"] == 64


def test_evaluate_reproduces_the_test_scores(ner_run, ner_file, tmp_path, capsys):
    output = tmp_path / "evaluation.json"
    figure = tmp_path / "figure.png"
    code = main(["evaluate", str(ner_run), ner_file, "--output", str(output), "--reliability", str(figure),
                 "--no-progress"])
    assert code == 0
    result = json.loads(output.read_text())
    recorded = json.loads((ner_run / run.METRICS_NAME).read_text())["test"]
    assert result["examples"] == 40 and result["split"] == "test"
    for name in ("f1", "accuracy", "ece", "nll", "um_confidence_ece"):
        assert result["metrics"][name] == pytest.approx(recorded[name], abs=1e-4), name
    assert figure.read_bytes().startswith(PNG_SIGNATURE)
    assert "ece" in capsys.readouterr().out

    degraded = run.evaluate(ner_run, ner_file, missing_rate=0.5, progress=False)
    assert degraded["missing_rate"] == 0.5 and degraded["examples"] == 40
    assert degraded["metrics"]["nll"] != result["metrics"]["nll"]


def test_umema_without_um_reports_softmax_scores_only(tiny_backbone, ner_file, tmp_path):
    output_dir = tmp_path / "ema-only"
    code = main(["train", "--model", tiny_backbone, "--data", ner_file, "--output-dir", str(output_dir), "--shots",
                 "16", "--epochs", "1", "--max-length", "48", "--no-use-um", "--no-progress"])
    assert code == 0
    metrics = json.loads((output_dir / run.METRICS_NAME).read_text())
    assert metrics["config"]["use_um"] is False and not UM_KEYS & set(metrics["test"])
    (result,) = run.predict(output_dir, ["Angela Merkel visited Paris"])
    for word in result["words"]:
        assert word["confidence"] == word["probability"] and word["aleatoric"] is None


def test_evaluate_matches_labels_by_name(ner_run, tmp_path, shared_data):
    """A file with person names only numbers its tags O, B-PER, I-PER: they must map onto the adapter's ids."""
    sentences = (shared_data / "ploner" / "connl03_train.txt").read_text(encoding="utf-8").split("\n\n")[:400]
    persons_only = [s for s in sentences if s.strip() and {line.split()[1] for line in s.splitlines()} <= {
        "O", "B-PER", "I-PER"} and "B-PER" in s]
    data = tmp_path / "persons.txt"
    data.write_text("\n\n".join(persons_only[:60]) + "\n", encoding="utf-8")
    result = run.evaluate(ner_run, data, progress=False)
    assert result["examples"] == 12 and 0 <= result["metrics"]["f1"] <= 1

    adapter_names = json.loads((ner_run / run.RUN_INFO_NAME).read_text())["label_names"]
    original = load_benchmark(data)["test"]
    relabeled = run._relabel(original, adapter_names, data)
    own_names = label_names_of(original)
    assert own_names == ["O", "B-PER", "I-PER"] and adapter_names != own_names
    for before, after in zip(original["ner_tags"], relabeled["ner_tags"]):
        assert [adapter_names[i] for i in after] == [own_names[i] for i in before]

    unknown = tmp_path / "unknown.txt"
    unknown.write_text("\n\n".join(f"Word{i} B-ANIMAL\nruns O" for i in range(20)) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="labels the adapter does not know: \\['B-ANIMAL', 'I-ANIMAL'\\]"):
        run.evaluate(ner_run, unknown, progress=False)


def test_predict_prints_one_aligned_row_per_word(ner_run, capsys):
    texts = ["Angela Merkel met officials in Paris on Monday .", "Shares of Siemens rose"]
    assert main(["predict", str(ner_run), *texts]) == 0
    out = capsys.readouterr().out
    blocks = out.strip().split("\n\n")
    assert len(blocks) == 2
    labels = set(json.loads((ner_run / run.RUN_INFO_NAME).read_text())["label_names"])
    for number, (block, text) in enumerate(zip(blocks, texts), start=1):
        title, header, *rows = block.splitlines()
        assert title == f"[{number}] {text}"
        assert header.split() == ["word", "label", "probability", "confidence", "aleatoric", "epistemic"]
        assert [row.split()[0] for row in rows] == text.split()
        label_start, probability_end = header.index("label"), header.index("probability") + len("probability")
        for row in rows:
            word, label, probability, confidence, *_ = row.split()
            assert label in labels and 0 <= float(probability) <= 1 and 0 <= float(confidence) <= 1
            assert row[label_start:].startswith(label) and row[:probability_end].endswith(probability)  # aligned

    assert main(["predict", str(ner_run), "--json", texts[1]]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert [w["word"] for w in result["words"]] == texts[1].split()
    assert all(w["aleatoric"] is not None and w["epistemic"] is not None for w in result["words"])

    # words past the run's max_length (64 tokens) get no tag rather than a made-up one
    (long,) = run.predict(ner_run, [" ".join(["Paris"] * 80)])
    assert len(long["words"]) == 80 and long["words"][0]["label"] is not None
    assert long["words"][-1] == {"word": "Paris", "label": None, "probability": None, "confidence": None,
                                 "aleatoric": None, "epistemic": None}


def test_sequence_task_with_plain_lora(tiny_backbone, shared_data, tmp_path, capsys):
    output_dir = tmp_path / "relations"
    data = save_relation_slice(shared_data, tmp_path / "semeval")
    code = main([
        "train", "--model", tiny_backbone, "--data", str(data), "--method", "lora",
        "--output-dir", str(output_dir), "--shots", "40", "--epochs", "1", "--batch-size", "8", "--max-length",
        "48", "--no-progress",
    ])
    assert code == 0
    metrics = json.loads((output_dir / run.METRICS_NAME).read_text())
    assert {"macro_f1"} | CALIBRATION_KEYS <= set(metrics["test"]) and not UM_KEYS & set(metrics["test"])
    assert "macro_f1" in metrics["dev"]
    capsys.readouterr()

    text = "The <e1>fire</e1> was caused by a <e2>cigarette</e2>."
    assert main(["predict", str(output_dir), text]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()
    assert header.split() == ["label", "probability", "confidence", "aleatoric", "epistemic", "text"]
    label, probability, confidence, aleatoric, epistemic, *_ = row.split()
    assert label in metrics["label_names"]
    assert probability == confidence and aleatoric == epistemic == "-"  # plain LoRA has no UM


def test_compare_tabulates_methods_over_seeds(tiny_backbone, ner_file, tmp_path, capsys):
    output_dir = tmp_path / "comparison"
    code = main([
        "compare", "--methods", "lora", "umema", "lora+ts", "--model", tiny_backbone, "--data", ner_file,
        "--shots", "24", "--seeds", "0", "1", "--epochs", "1", "--batch-size", "8", "--max-length", "32",
        "--output-dir", str(output_dir), "--no-progress",
    ])
    assert code == 0
    table = (output_dir / "comparison.md").read_text()
    assert table in capsys.readouterr().out
    for method in ("lora", "umema", "lora+ts"):
        assert f"| {method} |" in table
    assert "±" in table and (output_dir / "comparison.json").is_file()


def one_line_error(capsys, command: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"peft-umema {command}: error: ") and "Traceback" not in captured.err
    return lines[0]


def test_bad_input_gives_one_line_and_exit_code_2(tmp_path, ner_run, capsys):
    assert main(["predict", str(tmp_path / "missing"), "some text"]) == 2
    assert "not found" in one_line_error(capsys, "predict")

    assert main(["evaluate", str(tmp_path), "wnut16_demo"]) == 2
    assert run.RUN_INFO_NAME in one_line_error(capsys, "evaluate")

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["train", "--data", str(empty), "--output-dir", str(tmp_path / "run")]) == 2
    assert "empty" in one_line_error(capsys, "train")

    with pytest.raises(SystemExit) as exit_info:  # option values are checked by the parser, before any work
        main(["train", "--rank", "0"])
    assert exit_info.value.code == 2
    assert "argument --rank" in one_line_error(capsys, "train")

    assert main(["predict", str(ner_run), "  "]) == 2
    assert "empty" in one_line_error(capsys, "predict")

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--method", "nonexistent"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "compare", "reproduce"])
def test_help_shows_defaults_but_never_an_unset_none(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "(default: None)" not in help_text
    if command in ("train", "compare"):
        assert "(default: all)" in help_text and "(default: 16)" in help_text  # --dev-size; --batch-size
