"""What loading and saving a UMEMA adapter refuse, with messages that name the file, tensor or value at fault.

peft reports only missing keys that contain `lora_`, reads `adapter_model.bin` by unpickling when the safetensors
file is missing, and lets a corrupted header surface as a bare `SafetensorError`. These checks close those gaps;
`install_file_checks` wraps peft's loaders once, on `import peft_umema`.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Optional

import torch
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from torch import nn

MODULES_ATTR = "umema_modules"
PEFT_TYPE_NAME = "UMEMA"
BANK_SUFFIXES = ("bank.keys", "bank.values", "bank.write_pointer", "bank.fill_count", "bank.references",
                 "bank.reference_count")
CONVERT_HINT = (
    "convert a .bin you trust with: python -c \"import torch; from safetensors.torch import save_file; "
    "save_file(torch.load('adapter_model.bin', weights_only=True), 'adapter_model.safetensors')\""
)


def check_finite_state(state_dict: dict[str, torch.Tensor], action: str) -> None:
    """Refuse to `action` ('save' or 'load') an adapter holding NaN or inf values."""
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            if action == "save":
                raise FloatingPointError(
                    f"Refusing to save the adapter: {key} holds NaN or inf values (the model diverged). Lower the "
                    "learning rate and retrain from the last good checkpoint."
                )
            raise ValueError(
                f"The adapter file holds NaN or inf values in {key}: it is corrupted or was saved from a diverged "
                "model. Use an earlier checkpoint."
            )


# buffers that adapters saved before they existed lack; their initial value is those adapters' behaviour
BUFFERS_ADDED_LATER = ("confidence_novelty_weight",)


def check_loaded_state(model: nn.Module, config, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Check a UMEMA adapter's tensors against the model and its config before peft copies them in."""
    marker = f"{MODULES_ATTR}.{adapter_name}."
    _check_config_matches_weights(config, state_dict, marker)
    check_finite_state(state_dict, "load")
    _check_bank_buffers(config, state_dict, marker)
    model_state = model.state_dict()
    missing = [k for k in model_state if marker in k and k not in state_dict and not k.endswith(BUFFERS_ADDED_LATER)]
    if missing:
        raise ValueError(
            f"The adapter file for {adapter_name!r} lacks {len(missing)} UMEMA tensors (e.g. "
            f"{missing[0].split(marker, 1)[1]!r}): it is corrupted, truncated, or was saved without "
            f"use_um={config.use_um} / use_ema={config.use_ema}. Re-save it with save_pretrained()."
        )
    mismatches = [
        (key, tuple(tensor.shape), tuple(model_state[key].shape))
        for key, tensor in state_dict.items()
        if key in model_state and tuple(model_state[key].shape) != tuple(tensor.shape)
    ]
    # report the quantity a user can act on first: memory size, hidden size, label count, then anything else
    for key, saved, current in mismatches:
        if key.endswith(("bank.keys", "bank.values")):
            if saved[0] != current[0]:
                raise ValueError(f"Memory size mismatch: the adapter's bank has {saved[0]} slots, the config "
                                 f"asks for memory_size={current[0]}. Use the adapter's own adapter_config.json.")
            raise ValueError(f"Hidden size mismatch: the adapter's memory bank has hidden size {saved[1]}, the "
                             f"base model has {current[1]}. Load the adapter onto the base model it was trained on.")
    for key, saved, current in mismatches:
        if "modules_to_save" in key and saved[0] != current[0]:
            raise ValueError(f"Label count mismatch: the adapter's classification head has {saved[0]} labels, the "
                             f"base model has {current[0]}. Load the base model with num_labels={saved[0]}.")
    if mismatches:
        key, saved, current = mismatches[0]
        raise ValueError(f"Shape mismatch for {key}: the adapter has {saved}, the model has {current}. The adapter "
                         "was trained on a different base model or configuration.")


def _check_config_matches_weights(config, state_dict: dict[str, torch.Tensor], marker: str) -> None:
    """A config edited to switch UM or EMA off must not silently drop the weights (and memory) the file holds."""
    for switch, part, what in (("use_um", "uncertainty.", "the UM weights"),
                               ("use_ema", "memory.", "the EMA weights and the memory bank")):
        if getattr(config, switch):
            continue
        # keys the model has no module for pass through peft's remap without the adapter name
        dropped = [key for key in state_dict if f"{marker}{part}" in key or f"{MODULES_ATTR}.{part}" in key]
        if dropped:
            raise ValueError(
                f"adapter_config.json says {switch}=false, but the adapter file holds {what} ({len(dropped)} "
                f"tensors, e.g. {dropped[0].rsplit(MODULES_ATTR + '.', 1)[1]!r}); loading would drop them. Restore "
                f"{switch}: true in adapter_config.json, or re-save the adapter without them."
            )


def _check_bank_buffers(config, state_dict: dict[str, torch.Tensor], marker: str) -> None:
    size = config.memory_size
    for key, tensor in state_dict.items():
        if marker not in key or not key.endswith(BANK_SUFFIXES):
            continue
        name = key.split(marker, 1)[1]
        if key.endswith(("bank.keys", "bank.values", "bank.references")):
            if tensor.dim() != 2:
                raise ValueError(f"The adapter's {name} has shape {tuple(tensor.shape)}; a memory bank is a "
                                 f"(memory_size, hidden size) matrix. The adapter file is corrupted.")
            if key.endswith("bank.references") and tensor.shape[0] != config.novelty_references:
                raise ValueError(f"The adapter's bank holds {tensor.shape[0]} novelty references, the config asks "
                                 f"for novelty_references={config.novelty_references}. Use the adapter's own "
                                 "adapter_config.json.")
            continue
        if tensor.dim() != 0 or tensor.is_floating_point():
            raise ValueError(f"The adapter's {name} must be an integer scalar, got shape {tuple(tensor.shape)} "
                             f"dtype {tensor.dtype}. The adapter file is corrupted.")
        if key.endswith("reference_count"):
            high, setting = config.novelty_references, f"novelty_references={config.novelty_references}"
        else:
            high, setting = (size - 1 if key.endswith("write_pointer") else size), f"memory_size={size}"
        if not 0 <= int(tensor) <= high:
            raise ValueError(f"The adapter's {name} = {int(tensor)} is outside [0, {high}] for {setting}: "
                             "the adapter file is corrupted or its adapter_config.json was edited.")


# ----------------------------------------------------------------------------------------------------------------
# file-level checks around peft's loaders
# ----------------------------------------------------------------------------------------------------------------


def _local_folder(model_id: str, subfolder: Optional[str]) -> Optional[str]:
    path = os.path.join(model_id, subfolder) if subfolder else model_id
    return path if os.path.isdir(path) else None


def _declared_peft_type(model_id: str, hub_kwargs: dict) -> Optional[str]:
    from peft import PeftConfig

    try:
        peft_type = PeftConfig._get_peft_type(model_id, **hub_kwargs)
    except ValueError:
        return None
    return getattr(peft_type, "value", peft_type)


def checked_load_peft_weights(load_peft_weights):
    """Wrap peft's `load_peft_weights`: UMEMA adapters load from safetensors only, corrupted files are named, and a
    file holding UMEMA tensors is refused under another peft type (which would silently drop them)."""

    @functools.wraps(load_peft_weights)
    def wrapper(model_id, device=None, key_mapping=None, **hub_kwargs):
        from safetensors import SafetensorError

        peft_type = _declared_peft_type(model_id, hub_kwargs)
        folder = _local_folder(model_id, hub_kwargs.get("subfolder"))
        weights_file = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME) if folder else None
        if peft_type == PEFT_TYPE_NAME and folder is not None and not os.path.isfile(weights_file):
            raise FileNotFoundError(
                f"{folder} has no {SAFETENSORS_WEIGHTS_NAME}; UMEMA adapters load from safetensors only (a .bin "
                f"would be unpickled). Re-save the adapter with save_pretrained(), or {CONVERT_HINT}."
            )
        if peft_type == PEFT_TYPE_NAME and folder is None:
            from huggingface_hub import hf_hub_download

            try:  # fetch the safetensors file ourselves so that peft never falls back to the pickled .bin
                hf_hub_download(model_id, SAFETENSORS_WEIGHTS_NAME, **hub_kwargs)
            except Exception as error:
                raise FileNotFoundError(
                    f"Could not fetch {SAFETENSORS_WEIGHTS_NAME} of the UMEMA adapter {model_id!r} ({error}); "
                    "UMEMA adapters load from safetensors only."
                ) from None
        try:
            weights = load_peft_weights(model_id, device=device, key_mapping=key_mapping, **hub_kwargs)
        except SafetensorError as error:
            name = weights_file or f"{model_id}/{SAFETENSORS_WEIGHTS_NAME}"
            raise ValueError(f"{name} is corrupted or truncated ({error}); re-save or re-download the adapter.") \
                from None
        if peft_type != PEFT_TYPE_NAME and any(f"{MODULES_ATTR}." in key for key in weights):
            raise ValueError(
                f"The adapter at {model_id} holds UMEMA weights and a memory bank, but its adapter_config.json says "
                f"peft_type={peft_type!r}; loading it that way would drop UM, EMA and the memory. Restore "
                "\"peft_type\": \"UMEMA\" in adapter_config.json and `import peft_umema` before loading."
            )
        return weights

    wrapper._umema_wrapped = True
    return wrapper


def install_file_checks() -> None:
    """Wrap peft's adapter file readers (once; safe to call again)."""
    import peft.peft_model
    from peft.config import PeftConfigMixin

    if not getattr(peft.peft_model.load_peft_weights, "_umema_wrapped", False):
        peft.peft_model.load_peft_weights = checked_load_peft_weights(peft.peft_model.load_peft_weights)
    read_json = PeftConfigMixin.__dict__["from_json_file"].__func__
    if getattr(read_json, "_umema_wrapped", False):
        return

    @functools.wraps(read_json)
    def from_json_file(cls, path_json_file, **kwargs):
        """peft's reader, with a broken adapter_config.json named in the error."""
        try:
            return read_json(cls, path_json_file, **kwargs)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path_json_file} is not valid JSON ({error}); restore it from the saved adapter or "
                             "re-save the adapter with save_pretrained().") from None

    from_json_file._umema_wrapped = True
    PeftConfigMixin.from_json_file = classmethod(from_json_file)
