"""`compare` on a tiny random BERT and tiny slices of SemEval-2010 Task 8 and WNUT-2017."""

import json

import pytest
from test_cli import PNG_SIGNATURE, save_relation_slice, save_tiny_backbone
from test_methods import CHEAP_OPTIONS, save_wnut17_slice

from peft_umema.experiments import compare as comparison
from peft_umema.experiments import runs as run

ALL_METHODS = ["umema", "lora", "lora+ts", "mcdropout", "ensemble", "swag", "multiswag", "adue", "laplace"]
TRAINING = {"epochs": 2, "batch_size": 8, "max_length": 32, "learning_rate": 5e-3, "progress": False}
# MultiSWAG with SWAG's options, so that its run 0 is the `swag` fit
SWAG_OPTIONS = {"start_epoch": 0.5, "samples": 2}
OPTIONS = {**CHEAP_OPTIONS, "swag": SWAG_OPTIONS, "multiswag": {**SWAG_OPTIONS, "runs": 2}}


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory) -> str:
    return str(save_tiny_backbone(tmp_path_factory.mktemp("tiny-bert")))


@pytest.fixture(scope="module")
def relations(shared_data, tmp_path_factory) -> str:
    return str(save_relation_slice(shared_data, tmp_path_factory.mktemp("semeval"), train_records=80, test_records=24))


@pytest.fixture(scope="module")
def all_methods(tiny_backbone, relations, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("comparison")
    table = comparison.compare(
        ALL_METHODS, relations, 16, [0, 1], model=tiny_backbone, output_dir=output_dir, method_options=OPTIONS,
        test_size=20, **TRAINING,
    )
    return table, output_dir


def test_every_method_gets_a_row_with_mean_and_std(all_methods):
    table, output_dir = all_methods
    assert [row["method"] for row in table] == ALL_METHODS
    for row in table:
        assert row["seeds"] == 2 and row["errors"] == [], row
        for key in ("accuracy", "ece", "nll", "brier", "aurc", "fit_seconds", "trainable_parameters"):
            assert row[key]["mean"] is not None and row[key]["std"] is not None, (row["method"], key)

    markdown = (output_dir / comparison.TABLE_NAME).read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| Method"))
    for column in ("Accuracy", "ECE", "NLL", "Brier", "Error AUROC", "AURC", "Train time (s)", "Trainable params"):
        assert column in header
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| Method")]
    assert [line.split("|")[1].strip() for line in rows] == ALL_METHODS
    assert all(" ± " in line for line in rows)
    assert "test 20 (a fixed seeded subset of 24)" in markdown

    for name in ALL_METHODS:
        assert (output_dir / f"reliability_{name}.png").read_bytes().startswith(PNG_SIGNATURE)
        assert f"(reliability_{name}.png)" in markdown
    assert (output_dir / comparison.OVERLAY_NAME).read_bytes().startswith(PNG_SIGNATURE)
    assert not (output_dir / run.CHECKPOINTS_NAME).exists()


def test_json_holds_every_seed_and_the_shared_fits(all_methods):
    _, output_dir = all_methods
    results = json.loads((output_dir / comparison.RESULTS_NAME).read_text())
    assert results["sizes"] == {"dev": 8, "test": 20, "full_test": 24}
    assert results["method_options"]["mcdropout"] == {"samples": 3}
    runs = {(record["method"], record["seed"]): record for record in results["runs"]}
    assert len(runs) == len(ALL_METHODS) * 2

    for seed in (0, 1):
        lora = runs["lora", seed]
        # post-hoc methods and the ensemble start from the very LoRA fit of the `lora` row
        for name in ("lora+ts", "mcdropout", "ensemble", "adue", "laplace"):
            assert runs[name, seed]["base_fit_seconds"] == lora["fit_seconds"], name
            assert runs[name, seed]["fit_seconds"] >= lora["fit_seconds"], name
        assert runs["multiswag", seed]["base_fit_seconds"] == runs["swag", seed]["fit_seconds"]
        assert runs["adue", seed]["test"]["accuracy"] == lora["test"]["accuracy"]  # AdUE keeps LoRA's predictions
        assert set(runs["adue", seed]["method_details"]["error_detection_auroc"]) == {
            "adue", "softmax_response", "mahalanobis"
        }
        assert runs["laplace", seed]["method_details"]["variant"].startswith("lora,")
        assert runs["ensemble", seed]["trainable_parameters"] == 2 * lora["trainable_parameters"]

    # the table ends with UMEMA against its bars, over both seeds
    markdown = (output_dir / comparison.TABLE_NAME).read_text()
    verdict = next(line for line in markdown.splitlines() if line.startswith("UMEMA against its bars"))
    assert "(seeds 0, 1)" in verdict and "vs LoRA + TS" in verdict and "vs LoRA - 0.5 pt" in verdict

    # the error-detection column reads UM's own confidence for umema, the maximum probability for lora
    summary = {row["method"]: row for row in results["summary"]}
    for name, key in (("umema", "um_confidence_auroc_error"), ("lora", "auroc_error")):
        # null where a run got everything wrong (or right): nothing to rank
        expected = [runs[name, seed]["test"][key] for seed in (0, 1) if runs[name, seed]["test"][key] is not None]
        assert expected and summary[name]["auroc_error"]["mean"] == pytest.approx(sum(expected) / len(expected))


def test_a_failing_method_is_recorded_and_the_others_kept(tiny_backbone, shared_data, tmp_path):
    data = save_wnut17_slice(shared_data, tmp_path / "wnut17")
    table = comparison.compare(
        ["lora", "swag", "adue"], data, 16, [3], model=tiny_backbone, output_dir=tmp_path / "out",
        method_options={"swag": {"start_epoch": 50.0}}, **TRAINING,
    )
    rows = {row["method"]: row for row in table}
    assert rows["lora"]["seeds"] == rows["adue"]["seeds"] == 1 and rows["lora"]["f1"]["mean"] is not None
    assert rows["lora"]["f1"]["std"] is None  # one seed: no spread
    assert rows["swag"]["seeds"] == 0 and "SWAG collected no snapshot" in rows["swag"]["errors"][0]["error"]

    markdown = (tmp_path / "out" / comparison.TABLE_NAME).read_text()
    assert "Span F1" in markdown
    swag_line = next(line for line in markdown.splitlines() if line.startswith("| swag "))
    assert "seed 3 failed: ValueError: SWAG collected no snapshot" in swag_line and "—" in swag_line
    assert not (tmp_path / "out" / "reliability_swag.png").exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"methods": []}, "at least one method"),
        ({"methods": ["lora", "lora"]}, "Methods repeat"),
        ({"methods": ["bayes-by-magic"]}, "Unknown method 'bayes-by-magic'"),
        ({"seeds": []}, "at least one seed"),
        ({"seeds": [0, 0]}, "distinct integers"),
        ({"method_options": {"swag": {"samples": 2}}}, r"Options given for method\(s\) \['swag'\]"),
        ({"method_options": {"lora+ts": {"samples": 2}}}, "has no option"),
        ({"epochs_please": 3}, "Unknown training option"),
    ],
)
def test_bad_arguments_fail_before_any_training(arguments, message, tmp_path):
    call = {"methods": ["lora", "lora+ts"], "data": "wnut17", "shots": 16, "seeds": [0], "output_dir": tmp_path,
            **arguments}
    with pytest.raises(ValueError, match=message):
        comparison.compare(**call)
    assert not any(tmp_path.iterdir())
