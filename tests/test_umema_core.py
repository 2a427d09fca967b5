"""Core plugin behaviour over the case matrix {GPT-2, Llama, BERT} x {SEQ_CLS, TOKEN_CLS} on tiny random models."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import FAMILIES, HIDDEN, TASKS, tiny_batch, tiny_model
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModel

import peft_umema
from peft_umema import UMEMAConfig

CASES = [(family, task) for family in FAMILIES for task in TASKS]


def make(family, task, seed=0, **config):
    torch.manual_seed(seed)
    config.setdefault("memory_size", 8)
    return get_peft_model(tiny_model(family, task), UMEMAConfig(task_type=task, r=4, **config))


def bank_of(model, adapter="default"):
    return model.base_model.umema_modules[adapter].memory.bank


def train_steps(model, task, steps, start_seed=0):
    model.train()
    for step in range(steps):
        out = model(**tiny_batch(task=task, seed=start_seed + step))
        out.loss.backward()
        model.base_model.commit_memory()


@pytest.mark.parametrize("family,task", CASES)
def test_output_shapes(family, task):
    model = make(family, task)
    model.eval()
    out = model(**tiny_batch(task=task))
    expected = (4,) if task == "SEQ_CLS" else (4, 10)
    assert out.logits.shape == expected + (3,)
    for name in ("confidence", "aleatoric", "epistemic", "temperature"):
        assert out[name].shape == expected, name
        assert torch.isfinite(out[name]).all()
    assert ((out.confidence > 0) & (out.confidence < 1)).all()
    assert (out.aleatoric >= 0).all() and (out.epistemic >= 0).all()
    assert (out.temperature >= 0.5).all()


@pytest.mark.parametrize("family,task", CASES)
def test_gradients_reach_lora_um_ema_but_never_the_bank(family, task):
    model = make(family, task, init_lora_weights=False)
    model.train()
    model(**tiny_batch(task=task)).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for group in ("lora_A", "lora_B", ".uncertainty.", ".memory."):
        params = [p for n, p in trainable.items() if group in n]
        assert params, group
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), group
    missing = [n for n, p in trainable.items() if p.grad is None]
    assert not missing, missing
    bank = bank_of(model)
    assert all(not b.requires_grad for b in (bank.keys, bank.values))
    assert not any("bank" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("family,task", CASES)
def test_disabled_modules_equal_plain_lora(family, task):
    torch.manual_seed(1)
    ours = get_peft_model(
        tiny_model(family, task), UMEMAConfig(task_type=task, r=4, use_um=False, use_ema=False, init_lora_weights=False)
    )
    torch.manual_seed(1)
    lora = get_peft_model(tiny_model(family, task), LoraConfig(task_type=task, r=4, init_lora_weights=False))
    ours.eval(), lora.eval()
    batch = tiny_batch(task=task)
    assert torch.equal(ours(**batch).logits, lora(**batch).logits)
    assert torch.equal(ours(**batch).loss, lora(**batch).loss)


@pytest.mark.parametrize("family,task", CASES)
def test_save_load_round_trip_is_bit_identical(family, task, tmp_path):
    model = make(family, task, init_lora_weights=False)
    train_steps(model, task, steps=3)
    model.eval()
    batch = tiny_batch(task=task, seed=7)
    ref = model(**batch)
    model.save_pretrained(tmp_path)
    assert isinstance(PeftConfig.from_pretrained(tmp_path), UMEMAConfig)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith("bank.keys") for k in saved) and any(k.endswith("bank.write_pointer") for k in saved)
    assert "import peft_umema" in (tmp_path / "README.md").read_text()
    for low_cpu_mem_usage in (False, True):
        again = PeftModel.from_pretrained(tiny_model(family, task), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
        again.eval()
        out = again(**batch)
        for name in ("logits", "confidence", "aleatoric", "epistemic", "temperature"):
            assert torch.equal(ref[name], out[name]), name
        old, new = bank_of(model), bank_of(again)
        for name in ("keys", "values", "write_pointer", "fill_count"):
            assert torch.equal(getattr(old, name), getattr(new, name)), name
        assert int(new.write_pointer) == 3 and int(new.fill_count) == 3


@pytest.mark.parametrize("family,task", CASES)
def test_fifo_order_and_wrap_around(family, task):
    model = make(family, task, memory_size=4)
    bank = bank_of(model)
    model.train()
    written_keys = []
    for step in range(6):
        model(**tiny_batch(task=task, seed=step)).loss.backward()
        pending = bank._pending_sum
        written_keys.append(pending[: bank.dim] / pending[-1])
        assert model.base_model.commit_memory() == 1
        assert int(bank.fill_count) == min(step + 1, 4)
        assert int(bank.write_pointer) == (step + 1) % 4
    # slots 0,1 hold writes 4,5 (wrapped); slots 2,3 still hold writes 2,3
    for slot, step in zip(range(4), (4, 5, 2, 3)):
        assert torch.allclose(bank.keys[slot], written_keys[step])
    assert model.base_model.commit_memory() == 0  # nothing pending, nothing written


@pytest.mark.parametrize("family,task", CASES)
def test_bank_unchanged_in_eval_and_without_grad(family, task):
    model = make(family, task)
    train_steps(model, task, steps=2)
    bank = bank_of(model)
    snapshot = {n: getattr(bank, n).clone() for n in ("keys", "values", "write_pointer", "fill_count")}
    model.eval()
    for seed in range(3):
        model(**tiny_batch(task=task, seed=seed))
    model.train()
    with torch.no_grad():
        model(**tiny_batch(task=task))
    assert bank.pending_writes == 0
    model.base_model.commit_memory()
    for name, value in snapshot.items():
        assert torch.equal(getattr(bank, name), value), name


def test_accumulated_batches_make_one_write_equal_to_the_full_batch():
    """Micro-batches queued before one commit write the same slot as their concatenation would."""
    split, whole = make("gpt2", "SEQ_CLS"), make("gpt2", "SEQ_CLS")
    batch = tiny_batch(batch_size=4, seed=3)
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    split.train(), whole.train()
    for module in [*split.modules(), *whole.modules()]:
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for half in halves:
        split(**half).loss.backward()
    whole(**batch).loss.backward()
    assert bank_of(split).pending_writes == 2 and bank_of(split).fill_count == 0
    assert split.base_model.commit_memory() == 1 and whole.base_model.commit_memory() == 1
    assert torch.allclose(bank_of(split).keys, bank_of(whole).keys, atol=1e-6)
    assert torch.allclose(bank_of(split).values, bank_of(whole).values, atol=1e-6)


def test_memory_persists_and_new_task_gets_fresh_bank():
    model = make("bert", "SEQ_CLS", num_tasks=2)
    train_steps(model, "SEQ_CLS", steps=3)
    bank = bank_of(model)
    keys = bank.keys.clone()
    assert model.base_model.set_task(0) is False and torch.equal(bank.keys, keys)
    assert model.base_model.set_task(1) is True
    assert int(bank.fill_count) == 0 and int(bank.write_pointer) == 0 and not torch.equal(bank.keys, keys)
    with pytest.raises(ValueError, match="num_tasks"):
        model.base_model.set_task(2)


@pytest.mark.parametrize("task", TASKS)
def test_temperature_grows_with_uncertainty(task):
    model = make("llama", task)
    model.eval()
    estimator = model.base_model.umema_modules["default"].uncertainty
    captured = {}
    handle = estimator.register_forward_hook(lambda module, args, state: captured.setdefault("state", state))
    model(**tiny_batch(task=task))
    handle.remove()
    state = captured["state"]
    base = estimator.temperature(state)
    state.aleatoric = state.aleatoric + 1.0
    state.token_aleatoric = state.token_aleatoric + 1.0
    assert (estimator.temperature(state) > base).all()


@pytest.mark.parametrize("family,task", CASES)
def test_two_adapters_side_by_side(family, task, tmp_path):
    model = make(family, task)
    model.add_adapter("other", UMEMAConfig(task_type=task, r=4, memory_size=4))
    assert set(model.base_model.umema_modules) == {"default", "other"}
    assert bank_of(model).memory_size == 8 and bank_of(model, "other").memory_size == 4
    train_steps(model, task, steps=2)  # trains "default" only
    assert int(bank_of(model).fill_count) == 2 and int(bank_of(model, "other").fill_count) == 0
    model.set_adapter("other")
    assert all(p.requires_grad for p in model.base_model.umema_modules["other"].parameters())
    assert not any(p.requires_grad for p in model.base_model.umema_modules["default"].parameters())
    train_steps(model, task, steps=1)
    assert int(bank_of(model, "other").fill_count) == 1 and int(bank_of(model).fill_count) == 2
    model.eval()
    batch = tiny_batch(task=task, seed=3)
    out_other = model(**batch).logits
    model.set_adapter("default")
    out_default = model(**batch).logits
    assert not torch.allclose(out_other, out_default)
    model.save_pretrained(tmp_path)
    fresh = PeftModel.from_pretrained(tiny_model(family, task), tmp_path)
    fresh.load_adapter(tmp_path / "other", adapter_name="other")
    fresh.eval()
    assert torch.equal(fresh(**batch).logits, out_default)
    fresh.set_adapter("other")
    assert torch.equal(fresh(**batch).logits, out_other)
    assert torch.equal(bank_of(fresh, "other").keys, bank_of(model, "other").keys)
    model.delete_adapter("other")
    assert set(model.base_model.umema_modules) == {"default"}


def test_merge_and_unload_keeps_lora_and_drops_umema():
    model = make("gpt2", "SEQ_CLS", init_lora_weights=False)
    train_steps(model, "SEQ_CLS", steps=2)
    model.eval()
    batch = tiny_batch()
    with model.base_model.umema_disabled():
        lora_only = model(**batch).logits
    calibrated = model(**batch).logits
    assert not torch.allclose(lora_only, calibrated)
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "GPT2ForSequenceClassification"
    out = merged(**batch)
    assert torch.allclose(out.logits, lora_only, atol=1e-5)
    assert "confidence" not in out


def test_disable_adapter_context_gives_base_model():
    base = tiny_model("bert", "SEQ_CLS")
    batch = tiny_batch()
    base.eval()
    reference = base(**batch).logits
    model = make("bert", "SEQ_CLS", init_lora_weights=False)
    model.eval()
    with model.disable_adapter():
        out = model(**batch)
    assert torch.allclose(out.logits, reference, atol=1e-6) and "confidence" not in out


def test_export_lora_loads_without_plugin(tmp_path):
    model = make("llama", "TOKEN_CLS", init_lora_weights=False)
    train_steps(model, "TOKEN_CLS", steps=2)
    model.eval()
    batch = tiny_batch(task="TOKEN_CLS")
    with model.base_model.umema_disabled():
        expected = model(**batch).logits
    model.base_model.export_lora(str(tmp_path / "lora"))
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    save_file({**batch, "expected": expected.contiguous()}, tmp_path / "batch.safetensors")
    script = f"""
import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
import torch
from conftest import tiny_model
from peft import PeftModel
assert "peft_umema" not in sys.modules
model = PeftModel.from_pretrained(tiny_model("llama", "TOKEN_CLS"), {str(tmp_path / "lora")!r}).eval()
from safetensors.torch import load_file
batch = load_file({str(tmp_path / "batch.safetensors")!r})
expected = batch.pop("expected")
assert torch.equal(model(**batch).logits, expected)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr


def test_loading_without_import_fails_with_keyerror(tmp_path):
    make("gpt2", "SEQ_CLS").save_pretrained(tmp_path)
    script = f"from peft import PeftConfig; PeftConfig.from_pretrained({str(tmp_path)!r})"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode != 0 and "UMEMA" in result.stderr


def test_registration_is_idempotent():
    peft_umema.register()
    import importlib

    importlib.reload(peft_umema)
    assert get_peft_model(tiny_model("gpt2"), UMEMAConfig(task_type="SEQ_CLS")) is not None


def test_print_trainable_parameters_counts_um_and_ema(capsys):
    lora = get_peft_model(tiny_model("bert"), LoraConfig(task_type="SEQ_CLS", r=4))
    ours = make("bert", "SEQ_CLS")
    lora_count, _ = lora.get_nb_trainable_parameters()
    ours_count, _ = ours.get_nb_trainable_parameters()
    extra = sum(p.numel() for p in ours.base_model.umema_modules.parameters())
    assert ours_count == lora_count + extra
    ours.print_trainable_parameters()
    assert f"{ours_count:,}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"memory_size": 0}, "memory_size"),
        ({"memory_size": -3}, "memory_size"),
        ({"propagation_layers": -1}, "propagation_layers"),
        ({"quantization_levels": 1}, "quantization_levels"),
        ({"min_temperature": 1.5}, "min_temperature"),
        ({"context_pooling": "max"}, "context_pooling"),
        ({"confidence_loss_weight": -1}, "confidence_loss_weight"),
        ({"task_type": "CAUSAL_LM"}, "SEQ_CLS"),
    ],
)
def test_bad_config_values_raise(kwargs, match):
    kwargs.setdefault("task_type", "SEQ_CLS")
    with pytest.raises(ValueError, match=match):
        UMEMAConfig(**kwargs)


def test_unknown_option_raises():
    with pytest.raises(TypeError, match="memory_slots"):
        UMEMAConfig(task_type="SEQ_CLS", memory_slots=10)


def test_model_without_classification_head_raises():
    torch.manual_seed(0)
    backbone = AutoModel.from_config(tiny_model("bert").config)
    with pytest.raises(ValueError, match="classification head"):
        get_peft_model(backbone, UMEMAConfig(task_type="SEQ_CLS"))


def test_regression_head_raises():
    model = tiny_model("gpt2", num_labels=1)
    with pytest.raises(ValueError, match="num_labels=1"):
        get_peft_model(model, UMEMAConfig(task_type="SEQ_CLS"))


def _saved(tmp_path, **config):
    model = make("bert", "SEQ_CLS", **config)
    model.save_pretrained(tmp_path)
    return tmp_path


def test_memory_size_mismatch_names_both_values(tmp_path):
    path = _saved(tmp_path, memory_size=8)
    config = json.loads((path / "adapter_config.json").read_text())
    config["memory_size"] = 16
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"8 slots.*memory_size=16"):
        PeftModel.from_pretrained(tiny_model("bert"), path)


def test_hidden_size_mismatch_names_both_values(tmp_path):
    path = _saved(tmp_path)
    config = tiny_model("bert").config
    config.hidden_size = 2 * HIDDEN
    other = type(tiny_model("bert"))(config)
    with pytest.raises(ValueError, match=rf"hidden size {HIDDEN}.*has {2 * HIDDEN}"):
        PeftModel.from_pretrained(other, path)


def test_label_count_mismatch_names_both_values(tmp_path):
    path = _saved(tmp_path)
    with pytest.raises(ValueError, match=r"3 labels.*has 5.*num_labels=3"):
        PeftModel.from_pretrained(tiny_model("bert", num_labels=5), path)


def test_missing_memory_tensors_raise(tmp_path):
    path = _saved(tmp_path)
    state = load_file(path / "adapter_model.safetensors")
    state = {k: v for k, v in state.items() if "bank" not in k}
    save_file(state, path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="lacks .* UMEMA tensors"):
        PeftModel.from_pretrained(tiny_model("bert"), path)


def test_corrupted_adapter_file_raises(tmp_path):
    path = _saved(tmp_path)
    blob = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(Exception, match="(?i)safetensor|deserializ|incomplete|invalid"):
        PeftModel.from_pretrained(tiny_model("bert"), path)


def test_pipeline_works_unchanged():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, pipeline

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(90)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]")
    model = make("bert", "SEQ_CLS")
    model.eval()
    classify = pipeline("text-classification", model=model, tokenizer=tokenizer)
    result = classify(["w1 w2 w3", "w4 w5"])
    assert len(result) == 2 and 0 < result[0]["score"] <= 1
