"""QLoRA: UMEMA on bitsandbytes 4-bit and 8-bit backbones, on CPU, with real bitsandbytes layers.

Tiny random backbones with hidden sizes that are multiples of 64 (bitsandbytes' CPU 4-bit kernels need it). The
central case is the bitsandbytes 0.50 CPU bug (see peft_umema/tuner/quantization.py): an evaluation before or
between training steps must not stop the LoRA weights on the 4-bit layers from training.
"""

import json
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from conftest import tiny_batch
from datasets import Dataset
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from safetensors.torch import load_file
from test_cli import save_relation_slice
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlamaConfig,
    TrainingArguments,
)

from peft_umema import UMEMAConfig
from peft_umema.cli import main
from peft_umema.experiments import runs as run
from peft_umema.experiments.backbones import load_backbone, resolve_backbone
from peft_umema.training.trainer import UMEMATrainer
from peft_umema.tuner.quantization import prepare_quantized_layers

QUANTIZED_LAYERS = {"4bit": bnb.nn.Linear4bit, "8bit": bnb.nn.Linear8bitLt}
BANK_BUFFERS = ("keys", "values", "write_pointer", "fill_count")


def save_tiny_llama(folder: Path) -> Path:
    """A random 2-layer Llama (hidden 64, MLP 128) with MiniLM's WordPiece tokenizer, as a plain HF folder."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone("minilm"))
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


def quantized_umema(path: str, bits: str, task: str = "SEQ_CLS"):
    torch.manual_seed(0)
    base, _ = load_backbone(path, task, 3, **{f"load_in_{bits}": True})
    return get_peft_model(base, UMEMAConfig(task_type=task, r=4, memory_size=8, lora_dropout=0.0))


def lora_on_quantized_layers(model, layer_class) -> dict[str, torch.Tensor]:
    """Copies of the LoRA A and B weights of every LoRA layer whose base layer is quantized."""
    weights = {}
    for name, module in model.named_modules():
        if isinstance(getattr(module, "base_layer", None), layer_class):
            for part in ("lora_A", "lora_B"):
                weights[f"{name}.{part}"] = getattr(module, part)["default"].weight.detach().clone()
    assert weights, "no LoRA layer sits on a quantized layer"
    return weights


def moved(before: dict, after: dict) -> list[str]:
    return [name for name in before if not torch.equal(before[name], after[name])]


def bank_of(model):
    return model.base_model.umema_modules["default"].memory.bank


def train_rows(task: str, batches: int, seed: int) -> Dataset:
    rows = []
    for b in range(batches):
        batch = tiny_batch(task=task, seed=seed + b, batch_size=4)
        rows += [{k: v[i].tolist() for k, v in batch.items()} for i in range(4)]
    return Dataset.from_list(rows)


def trainer_for(model, folder: Path, steps: int, seed: int = 0, task: str = "SEQ_CLS") -> UMEMATrainer:
    args = TrainingArguments(
        output_dir=str(folder), per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=steps,
        learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", seed=seed, disable_tqdm=True,
    )
    return UMEMATrainer(model=model, args=args, train_dataset=train_rows(task, steps, seed),
                        eval_dataset=train_rows(task, 2, 100))


def eval_outputs(model, batch) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
    return {name: out[name] for name in ("logits", "confidence", "temperature")}


@pytest.mark.parametrize(("bits", "task"), [("4bit", "SEQ_CLS"), ("4bit", "TOKEN_CLS"), ("8bit", "SEQ_CLS")])
def test_eval_train_eval_train_save_reload(bits, task, tiny_llama, tmp_path):
    """Evaluated before training, trained, evaluated, trained more, saved and reloaded: LoRA on the quantized layers
    trains in both phases, UM/EMA/bank stay fp32, the reloaded model matches outputs and memory exactly."""
    model = quantized_umema(tiny_llama, bits, task)
    layer_class = QUANTIZED_LAYERS[bits]
    assert sum(isinstance(m, layer_class) for m in model.modules()) == 14  # q, k, v, o, gate, up, down x 2
    head = model.base_model.model.score
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in head.modules())
    probe = tiny_batch(task=task, seed=99)

    eval_outputs(model, probe)  # before any training: this pass used to freeze the 4-bit layers' gradients
    start = lora_on_quantized_layers(model, layer_class)
    model.train()
    trainer_for(model, tmp_path / "phase1", steps=4, task=task).train()
    after_first = lora_on_quantized_layers(model, layer_class)
    assert moved(start, after_first) == list(start)  # every A and B on every quantized layer

    metrics = trainer_for(model, tmp_path / "eval", steps=1, task=task).evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    model.train()
    trainer_for(model, tmp_path / "phase2", steps=3, seed=7, task=task).train()
    after_second = lora_on_quantized_layers(model, layer_class)
    assert moved(after_first, after_second) == list(start)
    assert int(bank_of(model).fill_count) == 7

    tuner_state = dict(model.base_model.umema_modules.named_parameters())
    tuner_state.update(model.base_model.umema_modules.named_buffers())
    for name, tensor in tuner_state.items():
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float32, name
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)

    expected = eval_outputs(model, probe)
    model.save_pretrained(tmp_path / "adapter")
    base, _ = load_backbone(tiny_llama, task, 3, **{f"load_in_{bits}": True})
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    for name in BANK_BUFFERS:
        assert torch.equal(getattr(bank_of(model), name), getattr(bank_of(reloaded), name)), name
    actual = eval_outputs(reloaded, probe)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)


def plain_4bit_base(path: str):
    """A 4-bit classifier loaded the usual way (not through load_backbone, so nothing guards it yet)."""
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["score"])
    base = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=3, quantization_config=quantization, device_map="cpu"
    )
    return prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)


def evaluate_first(base, batch) -> list:
    """An evaluation pass on the bare backbone; returns its 4-bit layers, repacked where the CPU bug applies."""
    base.eval()
    with torch.no_grad():
        base(**{k: v for k, v in batch.items() if k != "labels"})
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if bnb.functional.has_avx512bf16():  # the bug's precondition holds here: the pass did repack
        assert all(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    return layers


def assert_lora_trains(model, batch) -> None:
    model.train()
    model(**batch).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_prepare_quantized_layers_repairs_a_model_evaluated_first(tiny_llama):
    batch = tiny_batch(seed=0)
    base = plain_4bit_base(tiny_llama)
    layers = evaluate_first(base, batch)
    assert prepare_quantized_layers(base) == len(layers) == 14
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert not any(m.support_avx512bf16_for_cpu for m in layers)
    assert prepare_quantized_layers(base) == 14  # idempotent
    torch.manual_seed(0)
    model = get_peft_model(base, UMEMAConfig(task_type="SEQ_CLS", r=4, memory_size=8))
    eval_outputs(model, batch)  # evaluating again does not repack
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert_lora_trains(model, batch)


def test_umema_guards_a_4bit_backbone_evaluated_before_the_adapter(tiny_llama):
    """get_peft_model(UMEMAConfig) runs the guard itself (UMEMAModel.inject_adapter)."""
    batch = tiny_batch(seed=0)
    base = plain_4bit_base(tiny_llama)
    evaluate_first(base, batch)
    torch.manual_seed(0)
    model = get_peft_model(base, UMEMAConfig(task_type="SEQ_CLS", r=4, memory_size=8))
    eval_outputs(model, batch)
    assert_lora_trains(model, batch)


def test_prepare_quantized_layers_is_a_no_op_on_other_models():
    from conftest import tiny_model

    model = tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert prepare_quantized_layers(model) == 0
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def relation_data(shared_data, tmp_path_factory) -> str:
    return str(save_relation_slice(shared_data, tmp_path_factory.mktemp("semeval"), train_records=48,
                                   test_records=24))


def test_cli_trains_evaluates_and_predicts_in_4bit(tiny_llama, relation_data, tmp_path, capsys):
    output_dir = tmp_path / "run"
    code = main([
        "train", "--model", tiny_llama, "--data", relation_data, "--output-dir", str(output_dir), "--shots", "32",
        "--epochs", "2", "--batch-size", "8", "--max-length", "32", "--learning-rate", "5e-3", "--rank", "4",
        "--load-in-4bit", "--no-progress",
    ])
    assert code == 0
    info = json.loads((output_dir / run.RUN_INFO_NAME).read_text())
    assert info["load_in_4bit"] is True and "load_in_8bit" not in info
    metrics = json.loads((output_dir / run.METRICS_NAME).read_text())
    assert metrics["config"]["load_in_4bit"] is True and "accuracy" in metrics["test"]

    # every LoRA weight of the 4-bit attention and MLP projections trained (B starts at zero)
    saved = load_file(output_dir / "adapter_model.safetensors")
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    assert len(lora_b) == 14 and all(v.abs().sum() > 0 for v in lora_b)

    evaluation = tmp_path / "evaluation.json"
    assert main(["evaluate", str(output_dir), relation_data, "--output", str(evaluation), "--no-progress"]) == 0
    again = json.loads(evaluation.read_text())["metrics"]
    for name in ("accuracy", "ece", "nll"):
        assert again[name] == pytest.approx(metrics["test"][name], abs=1e-6), name
    capsys.readouterr()
    assert main(["predict", str(output_dir), "The cup is in the box.", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["label"] in metrics["label_names"]


def test_cli_refuses_both_quantizations(capsys):
    with pytest.raises(SystemExit) as error:
        main(["train", "--load-in-4bit", "--load-in-8bit"])
    assert error.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
