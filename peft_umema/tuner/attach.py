"""Where UM and EMA attach in a transformers classifier, resolved once per adapter.

Attach points are stored as module *names* (not module objects), so that they survive `copy.deepcopy`, peft's
wrapping of the head for `modules_to_save`, and moving the model; the forward pass looks them up at each call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
)

from ..constants import HEAD_MODULE_NAMES, SEQ_CLS, TOKEN_CLS

LAYER_LIST_SUFFIXES = ("layers", "layer", "h", "blocks")
TASK_CLASS_SUFFIXES = {SEQ_CLS: "ForSequenceClassification", TOKEN_CLS: "ForTokenClassification"}
TASK_CLASS_NAMES = {
    SEQ_CLS: set(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values()),
    TOKEN_CLS: set(MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES.values()),
}


@dataclass(frozen=True)
class AttachPoints:
    """One adapter's view of the backbone: head, the blocks UM/EMA read, pooling and padding conventions."""

    head_name: str
    layers_name: str
    num_layers: int  # length of the block list
    blocks_needed: int  # how many of the last blocks this adapter reads (0 = none)
    causal: bool  # decoder classifiers pool the last non-pad token
    pad_token_id: Optional[int]
    hidden_size: int

    def block_names(self) -> list[str]:
        first = self.num_layers - self.blocks_needed
        return [f"{self.layers_name}.{index}" for index in range(first, self.num_layers)]


def resolve_attach_points(model: nn.Module, config) -> AttachPoints:
    """Check that `model` is a classifier UMEMA can run on and find where this adapter's modules attach."""
    check_architecture(model, config)
    head_name = find_head_name(model, config.head_module_name)
    layers_name, layers = find_layer_list(model, config.layers_module_name)
    # a backbone with fewer blocks than propagation_layers propagates through all of them
    blocks_needed = min(max(config.propagation_layers, 1), len(layers)) if config.use_um else 0
    return AttachPoints(
        head_name=head_name,
        layers_name=layers_name,
        num_layers=len(layers),
        blocks_needed=blocks_needed,
        causal=is_causal_lm(model.config),
        pad_token_id=getattr(model.config, "pad_token_id", None),
        hidden_size=hidden_size_of(model.config),
    )


def check_architecture(model: nn.Module, config) -> None:
    """UMEMA runs on encoder-only or decoder-only single-label classifiers of the adapter's task type."""
    task = getattr(config.task_type, "value", config.task_type)
    model_config = getattr(model, "config", None)
    if getattr(model_config, "is_encoder_decoder", False):
        raise ValueError(
            f"{type(model).__name__} is an encoder-decoder model ({model_config.model_type}); UMEMA supports "
            "encoder-only (BERT-like) and decoder-only (GPT-2, Llama-like) classifiers. Use plain LoRA for it."
        )
    other = TOKEN_CLS if task == SEQ_CLS else SEQ_CLS
    class_name = type(model).__name__
    if class_name in TASK_CLASS_NAMES[other] or class_name.endswith(TASK_CLASS_SUFFIXES[other]):
        raise ValueError(
            f"The adapter's task_type is {task!r} but the base model is a {class_name} ({other}); load the base "
            f"with the matching Auto class (AutoModel{TASK_CLASS_SUFFIXES[task]}) or use an adapter trained for "
            f"{other}."
        )
    num_labels = getattr(model_config, "num_labels", None)
    problem_type = getattr(model_config, "problem_type", None)
    if num_labels is None or num_labels < 2 or problem_type not in (None, "single_label_classification"):
        raise ValueError(
            f"UMEMA calibrates single-label classifiers with >= 2 labels; this model has num_labels={num_labels}"
            f" and problem_type={problem_type!r}. Load the backbone with num_labels=<number of classes> and no "
            "regression/multi-label problem_type."
        )
    saved_type = getattr(config, "base_model_type", None)
    if saved_type and model_config is not None and saved_type != getattr(model_config, "model_type", None):
        raise ValueError(
            f"The adapter was trained on a {saved_type!r} backbone, the base model is {model_config.model_type!r}; "
            "load it onto the base model it was trained on."
        )


def find_head_name(model: nn.Module, configured: Optional[str]) -> str:
    names = (configured,) if configured else HEAD_MODULE_NAMES
    for name in names:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ValueError(
        f"{type(model).__name__} has no classification head (looked for {list(names)}). UMEMA calibrates a "
        "classifier: load the backbone with AutoModelForSequenceClassification or AutoModelForTokenClassification "
        "(with num_labels=...), or set UMEMAConfig(head_module_name=...) to the name of its head module."
    )


def find_layer_list(model: nn.Module, configured: Optional[str]) -> tuple[str, nn.ModuleList]:
    """The longest ModuleList of transformer blocks (e.g. `transformer.h`, `model.layers`, `bert.encoder.layer`)."""
    if configured:
        try:
            module = model.get_submodule(configured)
        except AttributeError:
            raise ValueError(f"UMEMAConfig(layers_module_name={configured!r}): {type(model).__name__} has no such "
                             "module.") from None
        if not isinstance(module, nn.ModuleList):
            raise ValueError(f"UMEMAConfig(layers_module_name={configured!r}) is a {type(module).__name__}, "
                             "not the nn.ModuleList of transformer blocks.")
        return configured, module
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in LAYER_LIST_SUFFIXES and len(module) > 0
    ]
    if not candidates:
        raise ValueError(
            f"Could not find the transformer blocks of {type(model).__name__}; set "
            "UMEMAConfig(layers_module_name='<dotted path of the nn.ModuleList of blocks>')."
        )
    return max(candidates, key=lambda item: len(item[1]))


def is_causal_lm(config) -> bool:
    """Causal decoders pool the last non-pad token; encoders (also usable as decoders, e.g. BERT) pool the mean."""
    model_type = getattr(config, "model_type", None)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def hidden_size_of(config) -> int:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("hidden_size", "n_embd", "d_model", "dim"):
        value = getattr(text_config, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"Cannot read the hidden size from {type(config).__name__}.")
