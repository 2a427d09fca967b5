"""The PEFT baselines of the paper's main table (experiments/peft_baselines.py) on a tiny random BERT."""

import math
import re

import pytest
import torch
from conftest import tiny_batch, tiny_model
from datasets import Dataset
from safetensors.torch import load_file, save_file
from test_cli import save_relation_slice, save_tiny_backbone
from test_methods import save_wnut17_slice
from transformers import Trainer, TrainerCallback, TrainingArguments

from peft_umema.baselines.lisa import LISACallback, sampled_blocks
from peft_umema.baselines.mixlora import (
    MixLoRALinear,
    MixLoRATrainer,
    add_mixlora_experts,
    load_balancing_loss,
)
from peft_umema.experiments import peft_baselines, runs
from peft_umema.experiments.baseline_methods import configured_method
from peft_umema.experiments.methods import METHODS, get_method
from peft_umema.tuner.attach import find_layer_list

TRAIN_OPTIONS = {"shots": 16, "seed": 0, "epochs": 3, "patience": 3, "batch_size": 4, "max_length": 32,
                 "learning_rate": 5e-3, "progress": False}


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory) -> str:
    return str(save_tiny_backbone(tmp_path_factory.mktemp("tiny-bert")))


def task_data(task: str, shared_data, tmp_path):
    if task == "relations":
        return save_relation_slice(shared_data, tmp_path / "semeval", train_records=80, test_records=24)
    return save_wnut17_slice(shared_data, tmp_path / "wnut17", sentences=40)


@pytest.mark.parametrize("task", ["relations", "tweets"])
def test_adalora_prunes_to_the_lora_budget_and_reloads(task, tiny_backbone, shared_data, tmp_path):
    data = task_data(task, shared_data, tmp_path)
    assert isinstance(get_method("adalora"), peft_baselines.AdaLoRAMethod)
    metrics = runs.train(tiny_backbone, data, tmp_path / "adalora", method="adalora", **TRAIN_OPTIONS)
    lora = runs.train(tiny_backbone, data, tmp_path / "lora", method="lora", **TRAIN_OPTIONS)
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


# ----------------------------------------------------------------------------------------------------------------
# LISA and MixLoRA through train / load_run / evaluate
# ----------------------------------------------------------------------------------------------------------------

# LISA with one of the tiny BERT's two blocks at a time, so that the count of trainable parameters means something
METHOD_OPTIONS = {"lisa": {"active_layers": 1, "interval": 2}, "mixlora": {"num_experts": 3, "top_k": 2}}


def parameters(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


@pytest.mark.parametrize("task", ["relations", "tweets"])
@pytest.mark.parametrize("method", ["lisa", "mixlora"])
def test_lisa_and_mixlora_train_reload_and_reproduce_their_metrics(method, task, tiny_backbone, shared_data, tmp_path,
                                                                   monkeypatch):
    data = task_data(task, shared_data, tmp_path)
    monkeypatch.setitem(METHODS, method, configured_method(method, METHOD_OPTIONS[method]))
    metrics = runs.train(tiny_backbone, data, tmp_path / method, method=method, **TRAIN_OPTIONS)
    assert metrics["epochs_trained"] == 3.0 and metrics["dev"]["epoch"] in (1.0, 2.0, 3.0)
    assert metrics["method_details"]["options"]["num_experts" if method == "mixlora" else "active_layers"] in (3, 1)
    monkeypatch.undo()  # the run folder alone says how to rebuild it: the registered defaults must not matter
    loaded = runs.load_run(tmp_path / method)
    model = loaded.fitted.model
    assert loaded.fitted.options == loaded.method.options_class(**metrics["method_details"]["options"])
    assert loaded.method.parameter_counts(loaded.fitted) == (metrics["trainable_parameters"],
                                                            metrics["total_parameters"])
    if method == "lisa":
        _, blocks = find_layer_list(model, None)
        assert metrics["trainable_parameters"] == metrics["total_parameters"] - parameters(blocks[0])
        assert (tmp_path / method / "lisa_model.safetensors").is_file()
    else:
        experts = [name for name, module in model.named_modules() if isinstance(module, MixLoRALinear)]
        assert experts and not any("pooler" in name or "classifier" in name for name in experts)
        expected = sum(
            parameters(module.router) + parameters(module.lora_A) + parameters(module.lora_B)
            for module in model.modules() if isinstance(module, MixLoRALinear)
        ) + parameters(model.classifier) + parameters(getattr(model.bert, "pooler", None) or torch.nn.Module())
        assert metrics["trainable_parameters"] == expected < metrics["total_parameters"]
        assert loaded.fitted.options.rank == 8 and loaded.fitted.options.target_modules == "all-linear"
    again = runs.evaluate(tmp_path / method, data, progress=False)
    assert again["metrics"] == pytest.approx(metrics["test"])
    # the best epoch was reloaded at the end of training: the saved weights score on dev what that epoch scored
    dev = runs.evaluate(tmp_path / method, data, split="validation", progress=False)["metrics"]
    selection = "macro_f1" if task == "relations" else "f1"
    assert dev[selection] == pytest.approx(metrics["dev"][selection], abs=1e-6)


@pytest.mark.parametrize("method", ["lisa", "mixlora"])
def test_a_missing_damaged_or_mismatched_weights_file_fails_naming_it(method, tiny_backbone, shared_data, tmp_path):
    data = task_data("relations", shared_data, tmp_path)
    folder = tmp_path / method
    runs.train(tiny_backbone, data, folder, method=method, **{**TRAIN_OPTIONS, "epochs": 1})
    weights = folder / f"{get_method(method).weights_name}.safetensors"
    named = re.escape(str(weights))
    saved = load_file(weights)
    metadata = {"method": "TrainedWeights"}

    first = min(saved)
    save_file({**saved, first: torch.zeros(3, 5)}, weights, metadata=metadata)
    with pytest.raises(ValueError, match=rf"{named} does not fit.*wrong shape: \['{first}: \(3, 5\)"):
        runs.load_run(folder)
    save_file({name: value for name, value in saved.items() if name != first}, weights, metadata=metadata)
    with pytest.raises(ValueError, match=rf"{named} does not fit.*missing keys \['{first}'\]"):
        runs.load_run(folder)
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=rf"{named} is damaged"):
        runs.load_run(folder)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{named} is missing"):
        runs.load_run(folder)


def test_bad_options_fail_clearly(tiny_backbone, shared_data, tmp_path, monkeypatch):
    for options, message in [
        ({"active_layers": 0}, "active_layers must be a positive integer"),
        ({"interval": 2.5}, "interval must be a positive integer"),
        ({"learning_rate_scale": 0}, r"learning_rate_scale must be a finite number > 0"),
        ({"learning_rate_scale": math.nan}, r"learning_rate_scale must be a finite number > 0"),
        ({"layers": 2}, "has no option"),
    ]:
        with pytest.raises(ValueError, match=message):
            configured_method("lisa", options)
    for options, message in [
        ({"num_experts": 0}, "num_experts must be a positive integer"),
        ({"top_k": 5}, r"top_k must be at most num_experts \(4\)"),
        ({"aux_loss_coefficient": -0.1}, r"aux_loss_coefficient must be a finite number >= 0"),
        ({"aux_loss_coefficient": math.inf}, r"aux_loss_coefficient must be a finite number >= 0"),
        ({"rank": 0}, "rank must be a positive integer"),
        ({"target_modules": []}, "target_modules must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            configured_method("mixlora", options)
    # more active blocks than the backbone has: found once the model is known
    monkeypatch.setitem(METHODS, "lisa", configured_method("lisa", {"active_layers": 3}))
    with pytest.raises(ValueError, match="active_layers=3, but the model has only 2 transformer blocks"):
        runs.train(tiny_backbone, task_data("relations", shared_data, tmp_path), tmp_path / "lisa", method="lisa",
                   **TRAIN_OPTIONS)


# ----------------------------------------------------------------------------------------------------------------
# LISA: which blocks train
# ----------------------------------------------------------------------------------------------------------------


class ChangeProbe(TrainerCallback):
    """Records, for every optimizer step, which parameters the step changed and which blocks required gradients."""

    def __init__(self, model, blocks):
        self.model, self.blocks, self.steps = model, blocks, []

    def on_step_begin(self, args, state, control, **kwargs):  # after LISA's, which was added first
        self.before = {name: value.detach().clone() for name, value in self.model.named_parameters()}
        self.trainable = {index for index, block in enumerate(self.blocks)
                          if all(parameter.requires_grad for parameter in block.parameters())}

    def on_step_end(self, args, state, control, **kwargs):
        changed = {name for name, value in self.model.named_parameters() if not torch.equal(value, self.before[name])}
        self.steps.append((self.trainable, changed))


def test_lisa_trains_the_sampled_blocks_and_always_the_rest(tmp_path):
    model = tiny_model("bert")
    blocks_name, blocks = find_layer_list(model, None)
    assert len(blocks) == 3
    batch = tiny_batch(batch_size=24, seq_len=8)
    train = Dataset.from_dict({name: value.tolist() for name, value in batch.items()})
    probe = ChangeProbe(model, blocks)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-3,
        lr_scheduler_type="constant", save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
    )
    lisa = LISACallback(blocks, active_layers=2, interval=2, seed=7)
    Trainer(model=model, args=args, train_dataset=train, callbacks=[lisa, probe]).train()

    assert len(probe.steps) == 6
    block_of = {name: int(name[len(blocks_name) + 1:].split(".")[0])
                for name, _ in model.named_parameters() if name.startswith(f"{blocks_name}.")}
    outside = {name for name, _ in model.named_parameters()} - set(block_of)
    samples = []
    for step, (trainable, changed) in enumerate(probe.steps):
        sample = set(sampled_blocks(3, 2, seed=7, period=step // 2))
        assert trainable == sample and len(sample) == 2
        assert {block_of[name] for name in changed if name in block_of} == sample
        assert all(name in changed for name, index in block_of.items() if index in sample)  # every weight of them
        assert outside <= changed  # embeddings, pooler and head train at every step
        samples.append(sample)
    assert samples[0] == samples[1] and samples[2] == samples[3] and samples[4] == samples[5]


def test_lisa_samples_depend_on_the_seed_and_period_only():
    assert sampled_blocks(12, 2, seed=3, period=5) == sampled_blocks(12, 2, seed=3, period=5)
    periods = [tuple(sampled_blocks(12, 2, seed=3, period=period)) for period in range(40)]
    assert all(len(set(sample)) == 2 and all(0 <= index < 12 for index in sample) for sample in periods)
    assert len(set(periods)) > 10 and {index for sample in periods for index in sample} == set(range(12))
    assert periods != [tuple(sampled_blocks(12, 2, seed=4, period=period)) for period in range(40)]


# ----------------------------------------------------------------------------------------------------------------
# MixLoRA: routing and the load-balancing loss
# ----------------------------------------------------------------------------------------------------------------


def test_mixlora_routes_each_token_to_its_top_k_experts():
    torch.manual_seed(0)
    layer = MixLoRALinear(torch.nn.Linear(8, 6), rank=2, alpha=4, dropout=0.1, num_experts=4, top_k=2).eval()
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 8)
    tokens = x.reshape(-1, 8)
    gates, balance = layer.routing(tokens)
    assert ((gates > 0).sum(-1) == 2).all() and torch.allclose(gates.sum(-1), torch.ones(15))
    top_two = layer.router(tokens).topk(2, dim=-1).indices
    assert torch.equal((gates > 0), torch.zeros_like(gates, dtype=torch.bool).scatter(-1, top_two, True))
    # output: the base layer plus the gated sum of the selected experts' B_e A_e x, scaled by alpha / r
    a = layer.lora_A.weight.view(4, 2, 8)
    b = layer.lora_B.weight.view(6, 4, 2).permute(1, 0, 2)  # [expert, out, rank]
    experts = torch.einsum("eor,eri,ni->neo", b, a, tokens)
    expected = layer.base(tokens) + 2.0 * (gates.unsqueeze(-1) * experts).sum(1)
    assert torch.allclose(layer(x), expected.view(3, 5, 6), atol=1e-6)
    # Switch-style balance: num_experts * sum_e (fraction routed to e) * (mean router probability of e)
    fraction = (gates > 0).float().mean(0)
    probability = layer.router(tokens).softmax(-1).mean(0)
    assert math.isfinite(balance.item()) and balance.item() > 0
    assert balance.item() == pytest.approx(4 * (fraction * probability).sum().item())
    assert layer.balance_loss.item() == pytest.approx(balance.item())  # the forward pass kept it for the Trainer


def test_mixlora_load_balancing_loss_reaches_the_trainer_loss(tmp_path):
    torch.manual_seed(0)
    model = add_mixlora_experts(tiny_model("bert"), ["query", "value", "dense"], ["classifier", "pooler"], rank=4,
                                alpha=8, dropout=0.0, num_experts=4, top_k=2).eval()
    trainable = {name.split(".")[-2] for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable == {"router", "lora_A", "lora_B", "classifier", "dense"}  # dense: the pooler's
    assert all("pooler" in name or not name.endswith("dense.weight")
               for name, parameter in model.named_parameters() if parameter.requires_grad)
    batch = tiny_batch()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    losses = {
        coefficient: MixLoRATrainer(model=model, args=args, aux_loss_coefficient=coefficient).compute_loss(
            model, dict(batch)).item()
        for coefficient in (0.0, 0.01)
    }
    balance = load_balancing_loss(model).item()
    assert math.isfinite(balance) and balance > 0
    assert losses[0.0] == pytest.approx(model(**batch).loss.item())
    assert losses[0.01] - losses[0.0] == pytest.approx(0.01 * balance, rel=1e-4)
