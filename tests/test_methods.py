"""The baselines as `peft-umema` methods, on a tiny random BERT and tiny slices of SemEval-2010 Task 8 and WNUT-2017:
each fits, writes the metrics `lora` writes, and reloads from its run folder to identical predictions."""

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import save_relation_slice, save_tiny_backbone
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from peft_umema.baselines.prediction import collect_logits, using_adapter
from peft_umema.data.loaders import label_names_of, load_benchmark, task_type_of
from peft_umema.data.preprocessing import (
    k_shot_subset,
    prepare_tokenizer,
    tokenize_dataset,
)
from peft_umema.experiments import baseline_methods as methods
from peft_umema.experiments import runs as run

BASELINES = ("lora+ts", "mcdropout", "ensemble", "swag", "multiswag", "adue", "laplace")
TRAINING = {"shots": 16, "epochs": 2, "batch_size": 8, "max_length": 32, "learning_rate": 5e-3, "progress": False}
# Small options, so that each method fits in seconds; `train` itself uses the defaults.
CHEAP_OPTIONS = {
    "mcdropout": {"samples": 3},
    "ensemble": {"members": 2},
    "swag": {"start_epoch": 0.5, "samples": 3},
    "multiswag": {"start_epoch": 0.5, "samples": 2, "runs": 2},
    "laplace": {"subset_of_weights": "lora", "n_samples": 3},
}


def save_wnut17_slice(shared_data: Path, folder: Path, sentences: int = 40) -> Path:
    """The first sentences of each WNUT-2017 file, in the official layout (sentences end at whitespace-only lines)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("wnut17train.conll", "emerging.dev.conll", "emerging.test.annotated"):
        kept, count = [], 0
        for line in (shared_data / "wnut17" / name).read_text(encoding="utf-8").splitlines():
            kept.append(line)
            count += not line.strip()
            if count == sentences:
                break
        (folder / name).write_text("\n".join(kept) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory) -> str:
    return str(save_tiny_backbone(tmp_path_factory.mktemp("tiny-bert")))


@pytest.fixture(scope="module")
def datasets_by_task(shared_data, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("data")
    return {
        "SEQ_CLS": str(save_relation_slice(shared_data, folder / "semeval", train_records=80, test_records=24)),
        "TOKEN_CLS": str(save_wnut17_slice(shared_data, folder / "wnut17")),
    }


@pytest.fixture(scope="module")
def lora_metrics(tiny_backbone, datasets_by_task, tmp_path_factory) -> dict:
    """What `train --method lora` writes: the keys every method must write too."""
    output_dir = tmp_path_factory.mktemp("lora")
    return run.train(tiny_backbone, datasets_by_task["SEQ_CLS"], output_dir, method="lora", **TRAINING)


@pytest.fixture(scope="module")
def sequence_lora(tiny_backbone, datasets_by_task, tmp_path_factory):
    """A `lora` fit on the SemEval slice, its setup and test batches, for the methods that build on it."""
    setup, test_batches = make_setup(tiny_backbone, datasets_by_task["SEQ_CLS"], tmp_path_factory.mktemp("work"))
    return run.get_method("lora").fit(setup), setup, test_batches


def make_setup(backbone: str, data: str, work_dir: Path, seed: int = 0) -> tuple[run.RunSetup, DataLoader]:
    """What `train` fits on, built the way `train` builds it, and the test batches."""
    splits = load_benchmark(data)
    splits["train"] = k_shot_subset(splits["train"], TRAINING["shots"], seed)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(backbone))
    tokenized = tokenize_dataset(splits, tokenizer, TRAINING["max_length"])
    options = run.TrainOptions(**{key: value for key, value in TRAINING.items() if key != "shots"})
    setup = run.RunSetup(
        backbone=backbone, task_type=task_type_of(splits), label_names=label_names_of(splits), tokenizer=tokenizer,
        train_dataset=tokenized["train"], eval_dataset=tokenized["validation"], options=options, seed=seed,
        work_dir=work_dir,
    )
    test_batches = DataLoader(tokenized["test"], batch_size=8, collate_fn=setup.collator)
    return setup, test_batches


def run_info(setup: run.RunSetup) -> dict:
    return {"backbone": setup.backbone, "task_type": setup.task_type, "label_names": setup.label_names}


def assert_same_predictions(first: run.Predictions, second: run.Predictions) -> None:
    for field in ("probs", "labels", "confidence"):
        expected, actual = getattr(first, field), getattr(second, field)
        assert (expected is None) == (actual is None), field
        if expected is not None:
            assert len(expected) == len(actual)
            for row_expected, row_actual in zip(expected, actual):
                np.testing.assert_array_equal(row_expected, row_actual, err_msg=field)


@pytest.mark.parametrize("name", BASELINES)
def test_train_writes_what_lora_writes_and_evaluate_reloads_it(
    name, tiny_backbone, datasets_by_task, lora_metrics, tmp_path
):
    """Sequence classification, through `train` and `evaluate` (default options); token classification below."""
    data = datasets_by_task["SEQ_CLS"]
    metrics = run.train(tiny_backbone, data, tmp_path, method=name, **TRAINING)

    reference = lora_metrics
    assert set(reference) <= set(metrics)
    own_confidence = {"um_confidence_ece", "um_confidence_auroc_error", "um_confidence_aurc"}
    expected_test_keys = set(reference["test"]) | (own_confidence if name == "adue" else set())
    assert set(metrics["test"]) == expected_test_keys
    assert metrics["method"] == name and metrics["task_type"] == "SEQ_CLS"
    assert metrics["trainable_parameters"] >= reference["trainable_parameters"] > 0
    assert metrics["timings"]["fit_seconds"] > 0
    assert json.loads((tmp_path / run.METRICS_NAME).read_text())["method"] == name
    assert json.loads((tmp_path / methods.METHOD_STATE_NAME).read_text())["method"] == name

    # batched as `train` batches the test split, so that MC dropout draws the same masks
    reloaded = run.evaluate(tmp_path, data, batch_size=2 * TRAINING["batch_size"], progress=False)
    assert reloaded["metrics"] == metrics["test"]


@pytest.mark.parametrize("name", BASELINES)
def test_token_task_fit_save_and_reload_give_identical_predictions(name, tiny_backbone, datasets_by_task, tmp_path):
    setup, test_batches = make_setup(tiny_backbone, datasets_by_task["TOKEN_CLS"], tmp_path / "work")
    method = methods.configured_method(name, CHEAP_OPTIONS.get(name))
    fitted = method.fit(setup)
    predictions = method.predict(fitted, test_batches, progress=False)
    assert len(predictions.probs) == len(test_batches.dataset)
    assert all(probs.shape == (len(labels), len(setup.label_names))
               for probs, labels in zip(predictions.probs, predictions.labels))

    method.save(fitted, tmp_path / "run")
    # the registered method, with default options, restores the options the run was fitted with
    registered = run.get_method(name)
    reloaded = registered.load(tmp_path / "run", run_info(setup))
    assert reloaded.options == method.options
    assert_same_predictions(predictions, registered.predict(reloaded, test_batches, progress=False))


def test_post_hoc_and_derived_fits_leave_their_base_unchanged(sequence_lora):
    """The comparison hands one LoRA fit to every method that builds on it: none may alter it."""
    lora, setup, test_batches = sequence_lora
    weights = copy.deepcopy(lora.model.state_dict())
    flags = {name: parameter.requires_grad for name, parameter in lora.model.named_parameters()}
    reference = run.get_method("lora").predict(lora, test_batches, progress=False)

    for name in ("lora+ts", "mcdropout", "adue", "laplace", "ensemble"):
        method = methods.configured_method(name, CHEAP_OPTIONS.get(name))
        assert method.base_method().name == "lora"
        fitted = method.fit_on(lora, setup)
        method.predict(fitted, test_batches, progress=False)

    assert lora.model.active_adapter == "default" and list(lora.model.peft_config) == ["default"]
    assert {name: parameter.requires_grad for name, parameter in lora.model.named_parameters()} == flags
    for key, value in lora.model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert_same_predictions(reference, run.get_method("lora").predict(lora, test_batches, progress=False))


def test_method_details_name_what_was_fitted(sequence_lora):
    lora, setup, test_batches = sequence_lora
    lora_trainable, _ = run.get_method("lora").parameter_counts(lora)

    def details(name, options=None):
        method = methods.configured_method(name, options)
        fitted = method.fit_on(lora, setup)
        return method, fitted, method.method_details(fitted, method.predict(fitted, test_batches, progress=False))

    adue, fitted, adue_details = details("adue")
    assert set(adue_details["error_detection_auroc"]) == {"adue", "softmax_response", "mahalanobis"}
    head = fitted.states["adue"].head
    assert adue.parameter_counts(fitted)[0] == lora_trainable + head.weight.numel() + head.bias.numel()

    _, _, laplace_details = details("laplace")
    assert laplace_details["variant"] == "last_layer, kron Hessian (CurvlinopsGGN), glm/probit predictive"
    assert laplace_details["options"] == {
        "subset_of_weights": "last_layer", "hessian_structure": "kron", "backend": "CurvlinopsGGN",
        "optimize_prior_precision": "marglik", "pred_type": "glm", "link_approx": "probit", "n_samples": 20,
    }
    assert laplace_details["prior_precision"] > 0
    # prior by NLL on dev, over laplace-torch's grid: one of its points
    _, fitted, grid_details = details("laplace", {"hessian_structure": "diag", "optimize_prior_precision": "gridsearch"})
    assert grid_details["variant"].startswith("last_layer, diag Hessian")
    assert min(abs(np.log10(grid_details["prior_precision"]) - np.linspace(-4, 4, 21))) < 1e-5

    scaling, fitted, scaling_details = details("lora+ts")
    assert scaling_details["temperature"] == fitted.states["temperature"].temperature > 0
    assert scaling.parameter_counts(fitted)[0] == lora_trainable + 1

    ensemble, fitted, _ = details("ensemble", {"members": 2})
    assert ensemble.parameter_counts(fitted)[0] == 2 * lora_trainable
    assert set(fitted.model.peft_config) == {"default", "member_1"}
    # member 1 predicts on the shared base model exactly as it did on its own (seeded, so refitting reproduces it)
    member = run.get_method("lora").fit(dataclasses.replace(setup, seed=setup.seed + methods.MEMBER_SEED_STRIDE))
    with using_adapter(fitted.model, "member_1"):
        copied = collect_logits(fitted.model, test_batches).logits
    assert torch.equal(copied, collect_logits(member.model, test_batches).logits)


def test_options_are_checked(tmp_path):
    assert methods.configured_method("mcdropout", {"samples": 4}).options.samples == 4
    assert methods.configured_method("mcdropout") is run.get_method("mcdropout")
    with pytest.raises(ValueError, match=r"has no option\(s\) \['members'\]; its options are \['samples'\]"):
        methods.configured_method("mcdropout", {"members": 2})
    with pytest.raises(ValueError, match="samples must be a positive integer"):
        methods.configured_method("swag", {"samples": 0})
    with pytest.raises(ValueError, match="subset_of_weights must be one of"):
        methods.configured_method("laplace", {"subset_of_weights": "everything"})
    with pytest.raises(ValueError, match='pred_type="nn" only'):
        methods.configured_method("laplace", {"subset_of_weights": "lora", "pred_type": "glm"})
    with pytest.raises(ValueError, match="optimize_prior_precision must be one of"):
        methods.configured_method("laplace", {"optimize_prior_precision": "dev_nll"})
    assert methods.configured_method("laplace", {"subset_of_weights": "lora"}).options.link_approx == "mc"
    with pytest.raises(ValueError, match="'lora' takes no options"):
        methods.configured_method("lora", {"samples": 2})
    with pytest.raises(FileNotFoundError, match="has no method_state.json"):
        run.get_method("swag").load(tmp_path, {})


def test_swag_says_when_training_ends_before_collecting(sequence_lora):
    _, setup, _ = sequence_lora
    with pytest.raises(ValueError, match="SWAG collected no snapshot.*lower start_epoch"):
        methods.configured_method("swag", {"start_epoch": 5.0}).fit(setup)


@pytest.mark.parametrize("token_task", [False, True])
def test_a_model_that_predicts_one_label_everywhere_is_reported(token_task):
    import warnings

    from peft_umema.experiments.methods import Predictions, TrainOptions
    from peft_umema.experiments.runs import _warn_if_one_label

    shape = (5, 3) if token_task else (3,)
    constant = np.zeros(shape)
    constant[..., 0] = 1.0
    mixed = constant.copy()
    mixed[..., 0], mixed[..., 2] = 0.0, 1.0
    names = ["O", "B-PER", "I-PER"]
    with pytest.warns(UserWarning, match=f"predicted 'O' for every test {'word' if token_task else 'example'}"):
        _warn_if_one_label(Predictions(probs=[constant, constant], labels=[]), names, "lora", TrainOptions())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_if_one_label(Predictions(probs=[constant, mixed], labels=[]), names, "lora", TrainOptions())
