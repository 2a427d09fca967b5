"""The PEFT baselines of the paper's main table (experiments/peft_baselines.py) on a tiny random BERT."""

import pytest
from test_cli import save_relation_slice, save_tiny_backbone
from test_methods import save_wnut17_slice

from peft_umema.experiments import peft_baselines, runs
from peft_umema.experiments.methods import get_method


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory) -> str:
    return str(save_tiny_backbone(tmp_path_factory.mktemp("tiny-bert")))


@pytest.mark.parametrize("task", ["relations", "tweets"])
def test_adalora_prunes_to_the_lora_budget_and_reloads(task, tiny_backbone, shared_data, tmp_path):
    if task == "relations":
        data = save_relation_slice(shared_data, tmp_path / "semeval", train_records=80, test_records=24)
    else:
        data = save_wnut17_slice(shared_data, tmp_path / "wnut17", sentences=40)
    assert isinstance(get_method("adalora"), peft_baselines.AdaLoRAMethod)
    options = dict(shots=16, seed=0, epochs=3, patience=3, batch_size=4, max_length=32, learning_rate=5e-3,
                   progress=False)
    metrics = runs.train(tiny_backbone, data, tmp_path / "adalora", method="adalora", **options)
    lora = runs.train(tiny_backbone, data, tmp_path / "lora", method="lora", **options)
    # trained 3 epochs (12 steps, the budget fixed after step 3) and reloaded the best epoch, whichever it was
    assert metrics["epochs_trained"] == 3.0 and metrics["dev"]["epoch"] in (1.0, 2.0, 3.0)
    loaded = runs.load_run(tmp_path / "adalora")
    config = loaded.fitted.model.peft_config["default"]
    assert config.peft_type.value == "ADALORA" and config.init_r == 12 and config.target_r == 8
    assert config.rank_pattern  # the allocation happened
    kept = sum(sum(pattern) for pattern in config.rank_pattern.values())
    assert kept <= 8 * len(config.rank_pattern)  # on average no more than LoRA's rank
    again = runs.evaluate(tmp_path / "adalora", data, progress=False)
    assert again["metrics"] == pytest.approx(metrics["test"])
    assert metrics["trainable_parameters"] > lora["trainable_parameters"]  # E vectors and the spare ranks of init_r
