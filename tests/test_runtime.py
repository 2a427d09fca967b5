"""The per-call UM/EMA runtime behaves like a peft model: copies, several adapters, merging, checkpointing, dtypes,
inputs_embeds, all-padding rows, non-finite numbers and bad saved state (tiny random models)."""

import copy
import json
import math

import pytest
import torch
from conftest import FAMILIES, TASKS, tiny_batch, tiny_config, tiny_model
from datasets import Dataset
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, TrainingArguments

import peft_umema
from peft_umema import UMEMAConfig, UMEMATrainer

CASES = [(family, task) for family in FAMILIES for task in TASKS]
FIELDS = ("logits", "confidence", "aleatoric", "epistemic", "temperature")


def make(family="bert", task="SEQ_CLS", seed=0, dropout=True, **config):
    torch.manual_seed(seed)
    config.setdefault("memory_size", 8)
    base = tiny_model(family, task)
    if not dropout:  # for comparing training passes over batches of different sizes
        for module in base.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        for name in list(vars(base.config)):
            if "dropout" in name or "pdrop" in name:
                setattr(base.config, name, 0.0)
        config["lora_dropout"] = 0.0
    return get_peft_model(base, UMEMAConfig(task_type=task, r=4, **config))


def outputs(model, task, seed=0, **batch_overrides):
    model.eval()
    batch = tiny_batch(task=task, seed=seed)
    batch.pop("labels")
    batch.update(batch_overrides)
    with torch.no_grad():
        out = model(**batch)
    return {name: out[name] for name in FIELDS}


def assert_same(a, b, atol=0.0):
    for name in FIELDS:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0 if atol == 0 else 1e-5, msg=name)


def train_steps(model, task, steps, start_seed=0):
    model.train()
    for step in range(steps):
        model(**tiny_batch(task=task, seed=start_seed + step)).loss.backward()
        model.base_model.commit_memory()
        model.zero_grad()


def bank(model, adapter="default"):
    return model.base_model.umema_modules[adapter].memory.bank


@pytest.mark.parametrize("family,task", CASES)
def test_deepcopy_gives_an_equal_independent_umema_model(family, task):
    model = make(family, task, init_lora_weights=False)
    train_steps(model, task, 2)
    before = outputs(model, task)
    clone = copy.deepcopy(model)
    assert_same(outputs(clone, task), before)
    batch = tiny_batch(task=task)
    batch.pop("labels")
    with model.base_model.umema_disabled(), torch.no_grad():
        plain_logits = model(**batch).logits
    assert not torch.equal(outputs(clone, task)["logits"], plain_logits)  # the copy still runs UM and EMA
    train_steps(clone, task, 2, start_seed=10)
    assert_same(outputs(model, task), before)  # training the copy leaves the original alone
    assert not torch.equal(bank(clone).keys, bank(model).keys)


@pytest.mark.parametrize("family,task", CASES)
def test_a_second_adapter_with_other_settings_never_changes_the_first(family, task, tmp_path):
    model = make(family, task, init_lora_weights=False, propagation_layers=1)
    first = outputs(model, task)
    model.add_adapter("other", UMEMAConfig(task_type=task, r=2, memory_size=4, propagation_layers=3, use_ema=False))
    assert_same(outputs(model, task), first)
    model.set_adapter("other")
    other = outputs(model, task)
    assert not torch.equal(other["confidence"], first["confidence"])
    model.set_adapter("default")
    assert_same(outputs(model, task), first)
    model.save_pretrained(tmp_path)
    model.delete_adapter("other")
    assert_same(outputs(model, task), first)
    # reload both, in the other order
    base = tiny_model(family, task)
    loaded = PeftModel.from_pretrained(base, tmp_path / "other", adapter_name="other")
    loaded.load_adapter(tmp_path, adapter_name="default")
    assert_same(outputs(loaded, task), other)
    loaded.set_adapter("default")
    assert_same(outputs(loaded, task), first)


@pytest.mark.parametrize("family,task", CASES)
def test_merge_adapter_keeps_um_and_ema_running(family, task):
    model = make(family, task, init_lora_weights=False)
    before = outputs(model, task)
    model.merge_adapter()
    assert_same(outputs(model, task), before, atol=1e-5)
    model.unmerge_adapter()
    assert_same(outputs(model, task), before, atol=1e-5)


@pytest.mark.parametrize("task", TASKS)
def test_inputs_embeds_give_the_same_outputs_as_input_ids(task):
    # unpadded rows: with inputs_embeds transformers' decoder classifiers cannot find the last non-pad token
    model = make("llama", task, init_lora_weights=False)
    input_ids = tiny_batch(task=task)["input_ids"].clamp_min(3)  # no pad token anywhere
    full = {"attention_mask": torch.ones_like(input_ids)}
    embeds = model.get_input_embeddings()(input_ids).detach()
    from_ids = outputs(model, task, input_ids=input_ids, **full)
    from_embeds = outputs(model, task, input_ids=None, inputs_embeds=embeds, **full)
    assert_same(from_embeds, from_ids, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("task", TASKS)
def test_half_precision_backbones_train_and_predict(task, dtype):
    torch.manual_seed(0)
    base = tiny_model("llama", task).to(dtype)
    model = get_peft_model(base, UMEMAConfig(task_type=task, r=4, memory_size=8, init_lora_weights=False))
    out = outputs(model, task)
    assert out["logits"].dtype == dtype
    for name in FIELDS:
        assert torch.isfinite(out[name].float()).all(), name
    model.train()
    loss = model(**tiny_batch(task=task)).loss
    assert torch.isfinite(loss)
    loss.backward()
    um = model.base_model.umema_modules["default"]
    assert all(p.dtype == torch.float32 for p in um.parameters())  # UM and EMA stay in full precision
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in um.parameters())
    assert model.base_model.commit_memory() == 1 and torch.isfinite(bank(model).keys).all()


def token_dataset(task, rows=8):
    records = []
    for seed in range(rows // 4):
        batch = tiny_batch(task=task, seed=seed)
        for i in range(4):
            records.append({k: v[i].tolist() for k, v in batch.items()})
    return Dataset.from_list(records)


def trainer_args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=1, learning_rate=1e-2,
                  report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=True, seed=0)
    values.update(overrides)
    return TrainingArguments(**values)


@pytest.mark.parametrize("task", TASKS)
def test_gradient_checkpointing_under_the_trainer_matches_plain_training(task, tmp_path):
    results = []
    for checkpointing in (False, True):
        model = make("llama", task, init_lora_weights=False)
        args = trainer_args(tmp_path / str(checkpointing), gradient_checkpointing=checkpointing,
                            gradient_checkpointing_kwargs={"use_reentrant": False})
        trainer = UMEMATrainer(model=model, args=args, train_dataset=token_dataset(task))
        trainer.train()
        results.append((model, [log["loss"] for log in trainer.state.log_history if "loss" in log]))
    (plain, plain_losses), (checkpointed, checkpointed_losses) = results
    assert plain_losses == pytest.approx(checkpointed_losses, abs=1e-4)
    assert torch.allclose(bank(plain).keys, bank(checkpointed).keys, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------------------------------------------


def with_empty_row(task):
    batch = tiny_batch(task=task)
    batch["attention_mask"][1] = 0
    batch["input_ids"][1] = 0
    if task == "TOKEN_CLS":
        batch["labels"][1] = -100
    return batch


@pytest.mark.parametrize("family,task", CASES)
def test_an_all_padding_row_gives_finite_outputs_and_is_left_out_of_the_memory(family, task):
    model = make(family, task, dropout=False, confidence_loss_weight=0.0)
    model.eval()
    with torch.no_grad():
        out = model(**with_empty_row(task))
    for name in FIELDS:
        assert torch.isfinite(out[name]).all(), name
    model.train()
    batch = with_empty_row(task)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    model.base_model.commit_memory()
    written = bank(model).keys[0].clone()
    assert torch.isfinite(bank(model).keys).all()
    # the same batch without the empty row writes the same slot
    twin = make(family, task, dropout=False, confidence_loss_weight=0.0)
    twin.train()
    keep = [0, 2, 3]
    twin(**{k: v[keep] for k, v in batch.items()}).loss.backward()
    twin.base_model.commit_memory()
    torch.testing.assert_close(bank(twin).keys[0], written, atol=1e-5, rtol=1e-5)


def test_a_non_finite_memory_write_raises_and_leaves_the_bank_untouched():
    model = make()
    memory_bank = bank(model)
    before = memory_bank.keys.clone(), int(memory_bank.write_pointer)
    memory_bank.queue_write(torch.full((2, memory_bank.dim), float("nan")), torch.zeros(2, memory_bank.dim))
    with pytest.raises(FloatingPointError, match="step 7"):
        model.base_model.commit_memory(step=7)
    assert torch.equal(memory_bank.keys, before[0]) and int(memory_bank.write_pointer) == before[1]


@pytest.mark.parametrize("task", TASKS)
def test_a_diverging_run_stops_with_a_clear_error_and_saves_nothing(task, tmp_path):
    model = make("bert", task, confidence_loss_weight=0.0)
    args = trainer_args(tmp_path, learning_rate=1e10, max_grad_norm=0.0, num_train_epochs=5, save_strategy="steps",
                        save_steps=1)
    trainer = UMEMATrainer(model=model, args=args, train_dataset=token_dataset(task))
    with pytest.raises(FloatingPointError, match="diverged"):
        trainer.train()
    for adapter_file in tmp_path.glob("checkpoint-*/adapter_model.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(adapter_file).values() if t.is_floating_point())
    with pytest.raises(FloatingPointError, match="Refusing to save"):
        model.save_pretrained(tmp_path / "diverged")


@pytest.mark.parametrize(
    "field", ["confidence_loss_weight", "gate_bias_init", "retrieval_temperature", "min_temperature"]
)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_config_floats_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"{field}=.*finite"):
        UMEMAConfig(task_type="SEQ_CLS", **{field: value})


def test_a_vanishing_retrieval_temperature_is_refused():
    with pytest.raises(ValueError, match="retrieval_temperature"):
        UMEMAConfig(task_type="SEQ_CLS", retrieval_temperature=1e-45)


@pytest.mark.parametrize(
    "option,value",
    [("use_dora", True), ("init_lora_weights", "loftq"), ("init_lora_weights", "pissa"), ("init_lora_weights", "olora"),
     ("layer_replication", [[0, 2]]), ("alora_invocation_tokens", [5]), ("lora_bias", True), ("use_qalora", True),
     ("trainable_token_indices", [1, 2]), ("target_parameters", ["weight"])],
)
def test_unsupported_lora_variants_are_refused(option, value):
    with pytest.raises(ValueError, match=f"{option}"):
        UMEMAConfig(task_type="SEQ_CLS", **{option: value})


# ---------------------------------------------------------------------------------------------------------------
# bad saved state
# ---------------------------------------------------------------------------------------------------------------


def saved_adapter(tmp_path, family="bert", task="SEQ_CLS"):
    model = make(family, task, init_lora_weights=False)
    train_steps(model, task, 2)
    model.save_pretrained(tmp_path)
    return tmp_path


def edit_tensor(folder, suffix, value):
    path = folder / "adapter_model.safetensors"
    state = load_file(path)
    key = next(k for k in state if k.endswith(suffix))
    state[key] = value(state[key])
    save_file(state, path)


def poisoned(tensor):
    tensor = tensor.clone()
    tensor.view(-1)[0] = float("nan")
    return tensor


@pytest.mark.parametrize(
    "suffix,value,match",
    [
        ("bank.keys", poisoned, "NaN or inf"),
        ("bank.values", lambda t: t * float("inf"), "NaN or inf"),
        ("uncertainty.prior", poisoned, "NaN or inf"),
        ("bank.write_pointer", lambda t: torch.tensor(100), r"write_pointer = 100 is outside \[0, 7\]"),
        ("bank.write_pointer", lambda t: torch.tensor(-1), "write_pointer = -1"),
        ("bank.fill_count", lambda t: torch.tensor(1000), r"fill_count = 1000 is outside \[0, 8\]"),
        ("bank.fill_count", lambda t: torch.tensor([1, 2]), "must be an integer scalar"),
        ("bank.write_pointer", lambda t: torch.tensor(1.5), "must be an integer scalar"),
        ("bank.keys", lambda t: t[0], r"has shape \(32,\).*matrix"),
        ("bank.keys", lambda t: t[0, 0], r"has shape \(\).*matrix"),
        ("bank.keys", lambda t: t.unsqueeze(0), r"has shape \(1, 8, 32\).*matrix"),
    ],
)
def test_bad_bank_state_is_refused_on_load_naming_the_tensor(tmp_path, suffix, value, match):
    folder = saved_adapter(tmp_path)
    edit_tensor(folder, suffix, value)
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(tiny_model("bert"), folder)


@pytest.mark.parametrize("switch", ["use_ema", "use_um"])
def test_a_config_switched_off_does_not_silently_drop_saved_weights(tmp_path, switch):
    folder = saved_adapter(tmp_path)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config[switch] = False
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{switch}=false.*would drop"):
        PeftModel.from_pretrained(tiny_model("bert"), folder)


def test_another_peft_type_does_not_silently_drop_the_memory(tmp_path):
    folder = saved_adapter(tmp_path)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["peft_type"] = "LORA"
    for key in list(config):
        if key not in peft_umema.UMEMAConfig.__dataclass_fields__ or key in UMEMAConfig.__dataclass_fields__ and \
                key not in __import__("peft").LoraConfig.__dataclass_fields__:
            config.pop(key)
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="peft_type='LORA'.*drop UM, EMA and the memory"):
        PeftModel.from_pretrained(tiny_model("bert"), folder)


def test_a_pickled_bin_is_refused_for_a_umema_adapter(tmp_path):
    folder = saved_adapter(tmp_path)
    weights = load_file(folder / "adapter_model.safetensors")
    torch.save(weights, folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors only.*save_file"):
        PeftModel.from_pretrained(tiny_model("bert"), folder)


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, b"garbage that is not a safetensors header"])
def test_a_corrupted_weights_file_is_named(tmp_path, content):
    folder = saved_adapter(tmp_path)
    (folder / "adapter_model.safetensors").write_bytes(content)
    with pytest.raises(ValueError, match="adapter_model.safetensors is corrupted or truncated"):
        PeftModel.from_pretrained(tiny_model("bert"), folder)


def test_an_invalid_adapter_config_is_named(tmp_path):
    folder = saved_adapter(tmp_path)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        PeftModel.from_pretrained(tiny_model("bert"), folder)


@pytest.mark.parametrize("saved_task,base_task", [("SEQ_CLS", "TOKEN_CLS"), ("TOKEN_CLS", "SEQ_CLS")])
def test_an_adapter_for_another_task_type_is_refused_naming_both(tmp_path, saved_task, base_task):
    folder = saved_adapter(tmp_path, task=saved_task)
    with pytest.raises(ValueError, match=f"task_type is '{saved_task}'.*{base_task}"):
        PeftModel.from_pretrained(tiny_model("bert", base_task), folder)


def test_an_adapter_for_another_architecture_is_refused_naming_both(tmp_path):
    folder = saved_adapter(tmp_path, family="bert")
    with pytest.raises(ValueError, match="'bert' backbone, the base model is 'llama'"):
        PeftModel.from_pretrained(tiny_model("llama"), folder)


def test_encoder_decoder_models_are_refused():
    from transformers import T5Config

    config = T5Config(vocab_size=96, d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, num_labels=3)
    base = AutoModelForSequenceClassification.from_config(config)
    with pytest.raises(ValueError, match="encoder-decoder"):
        get_peft_model(base, UMEMAConfig(task_type="SEQ_CLS", r=4))


def test_mixed_adapter_batches_are_refused():
    model = make()
    batch = tiny_batch()
    with pytest.raises(ValueError, match="one adapter per batch"):
        model(**batch, adapter_names=["default"] * 4)


# ---------------------------------------------------------------------------------------------------------------
# memory bank at scale
# ---------------------------------------------------------------------------------------------------------------


def test_top_k_retrieval_with_k_equal_to_the_bank_is_the_dense_read():
    dense = make(memory_size=16, init_lora_weights=False)
    sparse = make(memory_size=16, init_lora_weights=False, retrieval_top_k=16)
    assert_same(outputs(sparse, "SEQ_CLS"), outputs(dense, "SEQ_CLS"), atol=1e-6)
    top4 = make(memory_size=16, init_lora_weights=False, retrieval_top_k=4)
    out = outputs(top4, "SEQ_CLS")
    assert all(torch.isfinite(out[name]).all() for name in FIELDS)
    memory = top4.base_model.umema_modules["default"].memory
    query = torch.randn(3, memory.bank.dim)
    _, weights = memory.retrieve(query, None)
    assert ((weights > 0).sum(-1) == 4).all() and torch.allclose(weights.sum(-1), torch.ones(3))


def test_a_write_edits_one_slot_in_place():
    model = make(memory_size=16)
    memory_bank = bank(model)
    storage = memory_bank.keys.data_ptr()
    before = memory_bank.keys.clone()
    train_steps(model, "SEQ_CLS", 1)
    assert memory_bank.keys.data_ptr() == storage
    changed = (memory_bank.keys != before).any(-1)
    assert changed.tolist() == [True] + [False] * 15


# ---------------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------------


def test_top_level_imports():
    from peft_umema import MemoryUpdateCallback, UMEMAConfig, UMEMAModel, UMEMATrainer, calibrate_uncertainty

    assert callable(calibrate_uncertainty) and UMEMAModel.__name__ == "UMEMAModel"
    assert isinstance(peft_umema.training.callbacks.MemoryUpdateCallback(), MemoryUpdateCallback)
    assert UMEMATrainer.__module__.startswith("peft_umema.") and UMEMAConfig.__module__.startswith("peft_umema.")


def test_gpt2_conv1d_backbones_get_lora_on_all_linear_layers():
    from peft_umema.experiments.methods import linear_layers_but_head

    base = AutoModelForTokenClassification.from_config(tiny_config("gpt2"))
    names = linear_layers_but_head(base)
    assert {"c_attn", "c_proj", "c_fc"} <= set(names) and "classifier" not in names
    model = get_peft_model(base, UMEMAConfig(task_type="TOKEN_CLS", r=4, target_modules=names))
    model.train()
    model(**tiny_batch(task="TOKEN_CLS")).loss.backward()
    assert any("c_fc.lora_A" in n and p.grad is not None for n, p in model.named_parameters())
