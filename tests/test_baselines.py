"""Uncertainty baselines on tiny LoRA models of every family, for sequence and token classification."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, TASKS, tiny_batch, tiny_model
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments

from peft_umema.baselines.adue import (
    AdUE,
    MahalanobisDistance,
    error_detection_comparison,
    softmax_response,
)
from peft_umema.baselines.ensemble import LoraEnsemble, add_ensemble_members
from peft_umema.baselines.laplace import LaplaceApproximation
from peft_umema.baselines.mc_dropout import MCDropout
from peft_umema.baselines.prediction import (
    classification_head,
    collect_labels,
    collect_logits,
    predict_proba,
)
from peft_umema.baselines.swag import LoraSwag, MultiSwag, SwagCallback
from peft_umema.baselines.temperature import TemperatureScaling, fit_temperature

CASES = [(family, task) for family in FAMILIES for task in TASKS]
NUM_LABELS = 3
TARGET_MODULES = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}
TRAIN_SEEDS, DEV_SEEDS = [0, 1, 2], [10, 11]
DEV_LENS = [8, 10]


def lora_config(family, task, rank=4, lora_dropout=0.1):
    return LoraConfig(
        task_type=task,
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=lora_dropout,
        target_modules=TARGET_MODULES[family],
        fan_in_fan_out=family == "gpt2",
    )


def lora_model(family, task, seed=0, **config):
    return get_peft_model(tiny_model(family, task, NUM_LABELS, seed), lora_config(family, task, **config))


def batches(task, seeds, seq_lens=None):
    """A list of dict batches stands in for a DataLoader; differing lengths exercise the token padding."""
    seq_lens = seq_lens or [10] * len(seeds)
    return [tiny_batch(4, length, NUM_LABELS, task, seed) for seed, length in zip(seeds, seq_lens, strict=True)]


def train(model, train_batches, steps=25, lr=1e-2, after_step=None):
    parameters = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    model.train()
    for step in range(steps):
        loss = model(**train_batches[step % len(train_batches)]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(model)
    model.eval()


def nll(probs, labels):
    keep = labels != -100
    return F.nll_loss(probs[keep].clamp_min(1e-12).log(), labels[keep]).item()


def mean_max_prob(probs, labels):
    return probs[labels != -100].max(-1).values.mean().item()


def parameters_snapshot(model):
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def assert_unchanged(model, snapshot):
    changed = [name for name, param in model.named_parameters() if not torch.equal(param, snapshot[name])]
    assert not changed, changed[:3]


_TRAINED = {}


def trained_model(family, task):
    """A LoRA classifier overfitted to random labels: confident, and still wrong on held-out data. Shared; tests
    must leave it as they found it."""
    if (family, task) not in _TRAINED:
        model = lora_model(family, task)
        train(model, batches(task, TRAIN_SEEDS))
        _TRAINED[family, task] = model
    return _TRAINED[family, task]


# the shared prediction loop


@pytest.mark.parametrize("family,task", CASES)
def test_collect_logits_aligns_labels_and_head_features(family, task):
    model = trained_model(family, task)
    dev = batches(task, DEV_SEEDS, DEV_LENS)
    collected = collect_logits(model, dev, capture_features=True)
    labels = collect_labels(dev)
    assert torch.equal(collected.labels, labels)
    if task == "SEQ_CLS":
        assert collected.logits.shape == (8, NUM_LABELS) and collected.features.shape == (8, 32)
    else:  # padded to the longest batch, with -100 where a batch was shorter
        assert collected.logits.shape == (8, 10, NUM_LABELS) and collected.features.shape == (8, 10, 32)
        assert (labels[:4, 8:] == -100).all()
    # the captured features are exactly what the head turned into these logits (decoders: the pooled token)
    keep = labels != -100
    with torch.no_grad():
        rebuilt = classification_head(model)(collected.features)
    torch.testing.assert_close(rebuilt[keep], collected.logits[keep])


def test_batches_without_labels_are_rejected():
    model = lora_model("bert", "SEQ_CLS")
    batch = tiny_batch()
    del batch["labels"]
    with pytest.raises(ValueError, match="labels"):
        collect_logits(model, [batch])


# every method, both tasks


@pytest.mark.parametrize("family,task", CASES)
def test_every_method_predicts_aligned_probabilities(family, task):
    model = lora_model(family, task)
    train_batches = batches(task, TRAIN_SEEDS)
    dev = DataLoader(batches(task, DEV_SEEDS, DEV_LENS), batch_size=None)  # already-batched dicts, as a CLI would pass
    swag = LoraSwag(model, num_samples=2)
    train(model, train_batches, steps=3, after_step=swag.collect)
    ensemble = LoraEnsemble(add_ensemble_members(model, lora_config(family, task), num_members=2))
    temperature = TemperatureScaling()
    temperature.fit(model, dev)
    adue = AdUE(epochs=2)
    adue.fit(model, train_batches)
    methods = {
        "map": None,
        "temperature": temperature,
        "mc_dropout": MCDropout(num_samples=2),
        "swag": swag,
        "ensemble": ensemble,
        "adue": adue,
    }
    for subset in ("last_layer", "lora"):
        laplace = LaplaceApproximation(subset, "kron", n_samples=2)
        laplace.fit(model, train_batches[:1])
        methods[f"laplace_{subset}"] = laplace
    labels = collect_labels(dev)
    for name, method in methods.items():
        probs = predict_proba(model, dev) if method is None else method.predict_proba(model, dev)
        assert probs.shape == (*labels.shape, NUM_LABELS), name
        torch.testing.assert_close(probs.sum(-1), torch.ones(labels.shape), msg=name)
    assert adue.confidence(model, dev).shape == labels.shape


# temperature scaling


def overconfident_logits(task_shape, seed=0):
    """Logits whose argmax is right 60% of the time but which claim near-certainty."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(*task_shape, NUM_LABELS, generator=generator)
    labels = logits.argmax(-1)
    flip = torch.rand(task_shape, generator=generator) < 0.4
    labels[flip] = torch.randint(0, NUM_LABELS, task_shape, generator=generator)[flip]
    return 8 * logits, labels


def test_fit_temperature_lowers_nll_and_ignores_padding():
    logits, labels = overconfident_logits((64,))
    temperature = fit_temperature(logits, labels)
    assert temperature > 1
    assert F.cross_entropy(logits / temperature, labels) < F.cross_entropy(logits, labels)
    # token layout: positions labeled -100 must not move the fit, whatever their logits
    token_logits, token_labels = overconfident_logits((16, 6))
    padded_logits = torch.cat([token_logits, torch.full((16, 2, NUM_LABELS), 1e3)], dim=1)
    padded_labels = torch.cat([token_labels, torch.full((16, 2), -100)], dim=1)
    expected = fit_temperature(token_logits.reshape(-1, NUM_LABELS), token_labels.reshape(-1))
    assert fit_temperature(padded_logits, padded_labels) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("task", TASKS)
def test_temperature_scaling_calibrates_an_overconfident_model_and_round_trips(task, tmp_path):
    model = lora_model("gpt2", task)
    with torch.no_grad():
        classification_head(model).weight.mul_(300)
    dev = batches(task, DEV_SEEDS, DEV_LENS)
    labels = collect_labels(dev)
    scaler = TemperatureScaling()
    assert scaler.fit(model, dev) > 1
    calibrated = scaler.predict_proba(model, dev)
    assert nll(calibrated, labels) < nll(predict_proba(model, dev), labels)
    scaler.save(tmp_path / "temperature.safetensors")
    reloaded = TemperatureScaling()
    reloaded.load(tmp_path / "temperature.safetensors")
    assert torch.equal(reloaded.predict_proba(model, dev), calibrated)


def test_temperature_rejects_bad_input(tmp_path):
    logits, labels = overconfident_logits((8,))
    with pytest.raises(ValueError, match="align"):
        fit_temperature(logits, labels[:4])
    with pytest.raises(ValueError, match="-100"):
        fit_temperature(logits, torch.full((8,), -100))
    with pytest.raises(ValueError, match="labels must lie"):
        fit_temperature(logits, labels + NUM_LABELS)
    with pytest.raises(ValueError, match="positive"):
        TemperatureScaling(0.0)
    with pytest.raises(ValueError, match="positive"):
        TemperatureScaling().load_state_dict({"temperature": torch.tensor(-2.0)})


# MC dropout


def test_mc_dropout_samples_vary_repeatably_and_restore_modes():
    model = trained_model("gpt2", "SEQ_CLS")
    dev = batches("SEQ_CLS", DEV_SEEDS)
    samples = MCDropout(num_samples=3, seed=1).predict_samples(model, dev)
    assert not torch.allclose(samples[0], samples[1])
    assert torch.equal(samples, MCDropout(num_samples=3, seed=1).predict_samples(model, dev))
    assert not any(module.training for module in model.modules())


def test_mc_dropout_falls_back_on_lora_dropout_and_refuses_a_model_without_dropout():
    dev = batches("SEQ_CLS", DEV_SEEDS)
    llama = lora_model("llama", "SEQ_CLS", lora_dropout=0.3)  # the tiny Llama itself has no dropout layer
    train(llama, batches("SEQ_CLS", TRAIN_SEEDS), steps=5)
    samples = MCDropout(num_samples=2).predict_samples(llama, dev)
    assert not torch.allclose(samples[0], samples[1])
    with pytest.raises(ValueError, match="no dropout layer"):
        MCDropout().predict_proba(lora_model("llama", "SEQ_CLS", lora_dropout=0.0), dev)


# deep ensemble


def test_lora_ensemble_shares_one_base_model_and_averages_members():
    model = lora_model("bert", "TOKEN_CLS")
    shared_before = sum(param.numel() for name, param in model.named_parameters() if "lora_" not in name)
    names = add_ensemble_members(model, lora_config("bert", "TOKEN_CLS"), num_members=3, seed=7)
    train_batches, dev = batches("TOKEN_CLS", TRAIN_SEEDS), batches("TOKEN_CLS", DEV_SEEDS, DEV_LENS)
    for name in names:
        model.set_adapter(name)
        train(model, train_batches, steps=5)
    model.set_adapter("default")
    # one backbone: only the adapters and their head copies were added
    head_size = classification_head(model).weight.numel() + classification_head(model).bias.numel()
    shared_after = sum(param.numel() for name, param in model.named_parameters() if "lora_" not in name)
    assert shared_after == shared_before + len(names) * head_size
    ensemble = LoraEnsemble(names)
    members = ensemble.predict_samples(model, dev)
    assert members.shape[0] == 3 and not torch.allclose(members[0], members[1])
    torch.testing.assert_close(ensemble.predict_proba(model, dev), members.mean(0))
    assert model.active_adapter == "default"
    with pytest.raises(ValueError, match="not found"):
        LoraEnsemble(["missing"]).predict_proba(model, dev)
    with pytest.raises(ValueError, match="already exist"):
        add_ensemble_members(model, lora_config("bert", "TOKEN_CLS"), num_members=1, name_prefix="member_")


# SWAG


class TwoWeights(nn.Module):
    """A 1x1 linear layer: with rank-1 LoRA, the adapter is exactly two scalars, lora_A and lora_B."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(1, 1, bias=False)

    def forward(self, x):
        return self.proj(x)


def test_swag_moments_match_a_hand_computed_example():
    model = get_peft_model(TwoWeights(), LoraConfig(target_modules=["proj"], r=1, lora_alpha=1))
    swag = LoraSwag(model, max_rank=2)
    lora = [param for name, param in model.named_parameters() if "lora_" in name]
    for snapshot in [(1.0, 2.0), (3.0, 0.0), (2.0, 4.0)]:
        with torch.no_grad():
            for param, value in zip(lora, snapshot, strict=True):
                param.fill_(value)
        swag.collect(model)
    torch.testing.assert_close(swag.mean, torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(swag.second_moment, torch.tensor([14 / 3, 20 / 3]))
    torch.testing.assert_close(swag.variance, torch.tensor([2 / 3, 8 / 3]))
    # running means (1,2), (2,1), (2,2): deviations (0,0), (1,-1), (0,2); max_rank=2 keeps the last two
    torch.testing.assert_close(swag.deviations, torch.tensor([[1.0, -1.0], [0.0, 2.0]]))
    # samples follow N(mean, diag/2 + D^T D / (2 (K - 1)))
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [torch.cat([value.flatten() for value in swag.sample(generator).values()]) for _ in range(20000)]
    )
    expected_covariance = torch.diag(swag.variance) / 2 + swag.deviations.T @ swag.deviations / 2
    torch.testing.assert_close(draws.mean(0), swag.mean, atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(draws.T), expected_covariance, atol=0.08, rtol=0)


def test_swag_samples_vary_include_head_and_round_trip(tmp_path):
    model = lora_model("llama", "TOKEN_CLS")
    swag = LoraSwag(model, num_samples=3)
    with_head = LoraSwag(model, include_head=True)
    both = lambda trained: (swag.collect(trained), with_head.collect(trained))  # noqa: E731
    train(model, batches("TOKEN_CLS", TRAIN_SEEDS), steps=6, after_step=both)
    head = classification_head(model)
    assert with_head.mean.numel() == swag.mean.numel() + head.weight.numel() + head.bias.numel()
    dev = batches("TOKEN_CLS", DEV_SEEDS, DEV_LENS)
    before = parameters_snapshot(model)
    samples = swag.predict_samples(model, dev)
    assert not torch.allclose(samples[0], samples[1])
    assert_unchanged(model, before)  # sampled weights are put back
    swag.save(tmp_path / "swag.safetensors")
    reloaded = LoraSwag(lora_model("llama", "TOKEN_CLS", seed=5), num_samples=3)
    reloaded.load(tmp_path / "swag.safetensors")
    assert torch.equal(reloaded.predict_samples(model, dev), samples)


def test_swag_rejects_states_and_models_of_another_layout(tmp_path):
    model = lora_model("gpt2", "SEQ_CLS")
    swag = LoraSwag(model)
    with pytest.raises(RuntimeError, match="collect"):
        swag.predict_proba(model, batches("SEQ_CLS", DEV_SEEDS))
    swag.collect(model)
    swag.save(tmp_path / "gpt2.safetensors")
    other_layouts = [
        (lora_model("gpt2", "SEQ_CLS", rank=8), "wrong shape"),
        (lora_model("llama", "SEQ_CLS"), "missing"),
    ]
    for other, problem in other_layouts:
        with pytest.raises(ValueError, match=problem):
            LoraSwag(other).load(tmp_path / "gpt2.safetensors")
        with pytest.raises(ValueError, match="does not match"):
            swag.collect(other)
    with pytest.raises(ValueError, match="LoraSwag state"):
        TemperatureScaling().load(tmp_path / "gpt2.safetensors")
    with pytest.raises(TypeError, match="PeftModel"):
        LoraSwag(tiny_model("gpt2"))


def test_multiswag_averages_independent_runs():
    model = lora_model("bert", "SEQ_CLS")
    train_batches, dev = batches("SEQ_CLS", TRAIN_SEEDS), batches("SEQ_CLS", DEV_SEEDS)
    runs = []
    for name in add_ensemble_members(model, lora_config("bert", "SEQ_CLS"), num_members=2, seed=3, name_prefix="run_"):
        model.set_adapter(name)
        swag = LoraSwag(model, num_samples=2)
        train(model, train_batches, steps=6, after_step=swag.collect)
        runs.append(swag)
    model.set_adapter("default")
    multi = MultiSwag(runs)
    run_probs = [swag.predict_proba(model, dev) for swag in runs]
    assert not torch.allclose(run_probs[0], run_probs[1])
    torch.testing.assert_close(multi.predict_proba(model, dev), (run_probs[0] + run_probs[1]) / 2)
    assert multi.predict_samples(model, dev).shape[0] == 4


def test_swag_callback_collects_during_trainer_training(tmp_path):
    model = lora_model("gpt2", "SEQ_CLS")
    examples = [
        {key: value[row] for key, value in batch.items()}
        for batch in batches("SEQ_CLS", TRAIN_SEEDS)
        for row in range(4)
    ]
    by_steps, by_epochs = LoraSwag(model), LoraSwag(model)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    callbacks = [SwagCallback(by_steps, start_epoch=1, every_n_steps=2), SwagCallback(by_epochs, start_epoch=1)]
    Trainer(model=model, args=args, train_dataset=examples, callbacks=callbacks).train()
    # 3 steps an epoch: steps 2, 4, 6 end at epochs 2/3, 4/3, 2, so two step snapshots; epochs end at 1 and 2
    assert by_steps.num_snapshots == 2 and by_epochs.num_snapshots == 2
    torch.testing.assert_close(by_epochs.deviations[-1] + by_epochs.mean, by_steps.deviations[-1] + by_steps.mean)


# AdUE and its reference scores


@pytest.mark.parametrize("family,task", CASES)
def test_adue_trains_its_head_only_and_round_trips(family, task, tmp_path):
    model = trained_model(family, task)
    train_batches, dev = batches(task, TRAIN_SEEDS), batches(task, DEV_SEEDS, DEV_LENS)
    before = parameters_snapshot(model)
    adue = AdUE(epochs=15, learning_rate=1e-2, batch_size=16)
    history = adue.fit(model, batches(task, [20, 21]))
    assert history[-1] < history[0]
    assert_unchanged(model, before)  # base, LoRA and the fine-tuned head
    confidence = adue.confidence(model, dev)
    assert confidence.shape == collect_labels(dev).shape and ((confidence >= 0) & (confidence <= 1)).all()
    adue.save(tmp_path / "adue.safetensors")
    reloaded = AdUE()
    reloaded.load(tmp_path / "adue.safetensors")
    assert torch.equal(reloaded.confidence(model, dev), confidence)
    mahalanobis = MahalanobisDistance()
    mahalanobis.fit(model, train_batches)
    mahalanobis.save(tmp_path / "mahalanobis.safetensors")
    reloaded_mahalanobis = MahalanobisDistance()
    reloaded_mahalanobis.load(tmp_path / "mahalanobis.safetensors")
    assert torch.equal(reloaded_mahalanobis.confidence(model, dev), mahalanobis.confidence(model, dev))
    aurocs = error_detection_comparison(model, dev, adue, mahalanobis)
    assert set(aurocs) == {"softmax_response", "mahalanobis", "adue"}
    assert all(0 <= value <= 1 for value in aurocs.values())


def test_softmax_response_and_unfitted_scorers():
    assert torch.equal(softmax_response(torch.tensor([[0.2, 0.8], [0.6, 0.4]])), torch.tensor([0.8, 0.6]))
    model, dev = trained_model("bert", "SEQ_CLS"), batches("SEQ_CLS", DEV_SEEDS)
    with pytest.raises(RuntimeError, match="not fitted"):
        AdUE().confidence(model, dev)
    with pytest.raises(RuntimeError, match="not fitted"):
        MahalanobisDistance().confidence(model, dev)


# Laplace (laplace-torch)


def explicit_last_layer_probit(model, train_batches, features, structure, prior_precision):
    """The last-layer GGN posterior and its probit predictive written out with full matrices, from the head's
    weights and the training features alone: the reference laplace-torch's last-layer Laplace must reproduce.

    Parameters are ordered as laplace-torch flattens them: the weight row by row (class c, input i at c * H + i),
    then the bias. The GGN of the summed NLL is sum_n J_n^T Lambda_n J_n with Lambda = diag(p) - p p^T; "diag"
    keeps its diagonal; "kron" is K-FAC with weight and bias as separate blocks, (sum_n Lambda_n) kron
    (sum_n phi_n phi_n^T / N) for the weight and sum_n Lambda_n for the bias."""
    head = classification_head(model)
    weight, bias = head.weight.detach().double(), head.bias.detach().double()
    train_collected = collect_logits(model, train_batches, capture_features=True)
    phi = train_collected.features.double()
    probs = (phi @ weight.T + bias).softmax(-1)
    lambdas = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    num_classes = weight.shape[0]
    eye = torch.eye(num_classes, dtype=torch.float64)

    def jacobian(rows):  # [N, C, C * H + C]
        return torch.cat([torch.einsum("ck,ni->ncki", eye, rows).flatten(2), eye.expand(len(rows), -1, -1)], dim=2)

    if structure == "diag":
        ggn = torch.einsum("ncp,ncd,ndp->p", jacobian(phi), lambdas, jacobian(phi)).diag()
    else:
        weight_block = torch.kron(lambdas.sum(0), phi.T @ phi / len(phi))
        ggn = torch.block_diag(weight_block, lambdas.sum(0))
    covariance = torch.linalg.inv(ggn + prior_precision * torch.eye(len(ggn), dtype=torch.float64))
    test_phi = features.double()
    logits = test_phi @ weight.T + bias
    variance = torch.einsum("ncp,pq,ncq->nc", jacobian(test_phi), covariance, jacobian(test_phi))
    return (logits / torch.sqrt(1 + math.pi / 8 * variance)).softmax(-1)


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_last_layer_laplace_agrees_with_the_explicit_ggn_posterior(structure):
    """laplace-torch's last-layer Laplace (Curvlinops GGN) gives the probabilities of the GGN posterior written out
    by hand; "diag" is the exact GGN diagonal the earlier in-house implementation computed."""
    model = trained_model("bert", "SEQ_CLS")
    train_batches, dev = batches("SEQ_CLS", TRAIN_SEEDS), batches("SEQ_CLS", DEV_SEEDS)
    laplace = LaplaceApproximation("last_layer", structure, prior_precision=0.5)
    laplace.fit(model, train_batches)
    probs = laplace.predict_proba(model, dev)
    features = collect_logits(model, dev, capture_features=True).features
    reference = explicit_last_layer_probit(model, train_batches, features, structure, 0.5)
    torch.testing.assert_close(probs.double(), reference, atol=1e-6, rtol=0)
    # the posterior is what makes the difference: the MAP probabilities are far from it
    assert (reference - predict_proba(model, dev).double()).abs().max() > 1e-2


@pytest.mark.parametrize(
    "structure,pred_type,link_approx", [("kron", "glm", "probit"), ("diag", "glm", "mc"), ("full", "nn", "mc")]
)
def test_last_layer_laplace_is_less_confident_and_tunes_its_prior(structure, pred_type, link_approx, tmp_path):
    model = trained_model("bert", "SEQ_CLS")
    train_batches, dev = batches("SEQ_CLS", TRAIN_SEEDS), batches("SEQ_CLS", DEV_SEEDS)
    laplace = LaplaceApproximation(
        "last_layer", structure, pred_type=pred_type, link_approx=link_approx, n_samples=200
    )
    laplace.fit(model, train_batches)
    best = laplace.optimize_prior_precision("marglik", n_steps=200)
    # a maximum of the marginal likelihood, and inside the range where it is informative
    assert 1e-4 < best < 1e4
    for neighbour in (best / 1.5, best * 1.5):
        assert laplace.log_marginal_likelihood(best) > laplace.log_marginal_likelihood(neighbour)
    labels = collect_labels(dev)
    probs = laplace.predict_proba(model, dev)
    assert torch.equal(laplace.predict_proba(model, dev), probs)  # seeded, also when sampling
    if pred_type == "glm":
        assert mean_max_prob(probs, labels) < mean_max_prob(predict_proba(model, dev), labels)
    else:
        # the logits are linear in the head's weights, so sampling weights ("nn") and sampling the linearised
        # logits ("glm") draw from one predictive: equal up to Monte Carlo error
        laplace.save(tmp_path / "posterior.safetensors")
        linearised = LaplaceApproximation("last_layer", structure, pred_type="glm", link_approx="mc", n_samples=4000)
        linearised.load(tmp_path / "posterior.safetensors")
        torch.testing.assert_close(probs, linearised.predict_proba(model, dev), atol=0.02, rtol=0)

    chosen = laplace.optimize_prior_precision("gridsearch", model, dev, log_prior_prec_min=-2, log_prior_prec_max=2,
                                              grid_size=5)
    grid = [1e-2, 1e-1, 1.0, 1e1, 1e2]
    assert any(math.isclose(chosen, value, rel_tol=1e-5) for value in grid)
    if link_approx == "probit":  # deterministic: our own NLL of each grid value picks the same one
        nlls = []
        for value in grid:
            laplace.prior_precision = value
            nlls.append(nll(laplace.predict_proba(model, dev), labels))
        assert math.isclose(chosen, grid[nlls.index(min(nlls))], rel_tol=1e-5)
    laplace.prior_precision = chosen
    expected = laplace.predict_proba(model, dev)
    laplace.save(tmp_path / "laplace.safetensors")
    reloaded = LaplaceApproximation("last_layer", structure, pred_type=pred_type, link_approx=link_approx,
                                    n_samples=200)
    reloaded.load(tmp_path / "laplace.safetensors")
    assert reloaded.prior_precision == chosen
    torch.testing.assert_close(reloaded.predict_proba(model, dev), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(reloaded.log_marginal_likelihood(), laplace.log_marginal_likelihood())


@pytest.mark.parametrize("structure,backend", [("kron", "CurvlinopsGGN"), ("diag", "AsdlGGN")])
def test_lora_laplace_samples_lora_weights_and_round_trips(structure, backend, tmp_path):
    model = trained_model("llama", "TOKEN_CLS")
    train_batches, dev = batches("TOKEN_CLS", TRAIN_SEEDS), batches("TOKEN_CLS", DEV_SEEDS, DEV_LENS)
    before = parameters_snapshot(model)
    flags = {name: param.requires_grad for name, param in model.named_parameters()}
    laplace = LaplaceApproximation("lora", structure, n_samples=8, backend=backend)
    laplace.fit(model, train_batches)
    # the posterior covers the LoRA weights only, counting every labeled token as one data point
    lora_names = [name for name in before if "lora_" in name]
    assert laplace.laplace.n_params == sum(before[name].numel() for name in lora_names)
    assert laplace.laplace.n_data == int((collect_labels(train_batches) != -100).sum())
    laplace.optimize_prior_precision("marglik")
    labels = collect_labels(dev)
    probs = laplace.predict_proba(model, dev)
    assert probs.shape == (*labels.shape, NUM_LABELS)
    assert mean_max_prob(probs, labels) < mean_max_prob(predict_proba(model, dev), labels)
    assert_unchanged(model, before)
    assert {name: param.requires_grad for name, param in model.named_parameters()} == flags
    posterior_mean = laplace.laplace.mean
    assert all(param.data_ptr() != posterior_mean.data_ptr() for param in model.parameters())  # no aliasing
    laplace.save(tmp_path / "lora_laplace.safetensors")
    reloaded = LaplaceApproximation("lora", structure, n_samples=8, backend=backend)
    reloaded.load(tmp_path / "lora_laplace.safetensors")
    assert torch.equal(reloaded.predict_proba(model, dev), probs)
    with pytest.raises(ValueError, match="do not match"):
        reloaded.predict_proba(lora_model("llama", "TOKEN_CLS", rank=2), dev)


def test_laplace_rejects_bad_settings_and_states(tmp_path):
    with pytest.raises(ValueError, match="subset_of_weights"):
        LaplaceApproximation("everything")
    with pytest.raises(ValueError, match="hessian_structure"):
        LaplaceApproximation("lora", "full")
    with pytest.raises(ValueError, match='pred_type="nn" only'):
        LaplaceApproximation("lora", "kron", pred_type="glm")
    with pytest.raises(ValueError, match='link_approx="mc" only'):
        LaplaceApproximation("last_layer", pred_type="nn", link_approx="probit")
    with pytest.raises(ValueError, match="backend"):
        LaplaceApproximation(backend="BackPackGGN")
    with pytest.raises(ValueError, match="positive"):
        LaplaceApproximation(prior_precision=0.0)
    model = trained_model("gpt2", "SEQ_CLS")
    with pytest.raises(RuntimeError, match="not fitted"):
        LaplaceApproximation().log_marginal_likelihood()
    kron = LaplaceApproximation("last_layer", "kron")
    kron.fit(model, batches("SEQ_CLS", TRAIN_SEEDS))
    kron.save(tmp_path / "kron.safetensors")
    with pytest.raises(ValueError, match="does not match"):
        LaplaceApproximation("last_layer", "diag").load(tmp_path / "kron.safetensors")
    with pytest.raises(ValueError, match="gridsearch"):
        kron.optimize_prior_precision("gridsearch")
    with pytest.raises(ValueError, match="method must be one of"):
        kron.optimize_prior_precision("dev_nll")
