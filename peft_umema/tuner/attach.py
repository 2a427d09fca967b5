"""Where UM and EMA attach in a transformers classifier: embeddings, transformer blocks, classification head."""

from __future__ import annotations

from typing import Optional

from torch import nn
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

HEAD_MODULE_NAMES = ("score", "classifier")
LAYER_LIST_SUFFIXES = ("layers", "layer", "h", "blocks")


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


def find_layer_list(model: nn.Module, configured: Optional[str]) -> nn.ModuleList:
    """The longest ModuleList of transformer blocks (e.g. `transformer.h`, `model.layers`, `bert.encoder.layer`)."""
    if configured:
        module = model.get_submodule(configured)
        if not isinstance(module, nn.ModuleList):
            raise ValueError(f"UMEMAConfig(layers_module_name={configured!r}) is a {type(module).__name__}, "
                             "not the nn.ModuleList of transformer blocks.")
        return module
    candidates = [
        module
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in LAYER_LIST_SUFFIXES and len(module) > 0
    ]
    if not candidates:
        raise ValueError(
            f"Could not find the transformer blocks of {type(model).__name__}; set "
            "UMEMAConfig(layers_module_name='<dotted path of the nn.ModuleList of blocks>')."
        )
    return max(candidates, key=len)


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
