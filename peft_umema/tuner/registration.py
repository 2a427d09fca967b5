"""Make `UMEMA` a first-class PEFT type, so `get_peft_model`, `PeftConfig.from_pretrained` and
`PeftModel.from_pretrained` find our classes. Runs on `import peft_umema`; safe to run twice."""

from __future__ import annotations

import functools
import os

from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method

from .checks import PEFT_TYPE_NAME

MODEL_CARD_SECTION = """
## UMEMA adapter

This adapter was trained with [peft_umema](https://pypi.org/project/peft_umema/) (LoRA + Uncertainty Modeling +
External Memory Augmentation). Loading it needs the plugin to be imported first:

```python
import peft_umema  # registers the UMEMA adapter type with peft
from peft import PeftModel
model = PeftModel.from_pretrained(base_model, "<this repo or folder>")
```

The memory bank (keys, values, write pointer, fill count) is stored in `adapter_model.safetensors`.
"""


def _add_peft_type_member(name: str) -> None:
    """peft only registers names that already are `PeftType` members; add ours to the enum's tables."""
    if name in PeftType.__members__:
        return
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member.__init__(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    # EnumType.__setattr__ refuses new members; attribute access (PeftType.UMEMA) reads the class dict
    type.__setattr__(PeftType, name, member)


def _with_umema_model_card(create_or_update_model_card):
    """peft writes its own README.md on save; append how to load a UMEMA adapter (it needs `import peft_umema`)."""

    @functools.wraps(create_or_update_model_card)
    def wrapper(self, output_dir: str):
        create_or_update_model_card(self, output_dir)
        peft_type = getattr(self.active_peft_config.peft_type, "value", self.active_peft_config.peft_type)
        path = os.path.join(output_dir, "README.md")
        if peft_type != PEFT_TYPE_NAME or not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if "## UMEMA adapter" not in text:
            with open(path, "a", encoding="utf-8") as f:
                f.write(MODEL_CARD_SECTION)

    wrapper._umema_wrapped = True
    return wrapper


def register() -> None:
    from .checks import install_file_checks
    from .config import UMEMAConfig
    from .model import UMEMAModel

    _add_peft_type_member(PEFT_TYPE_NAME)
    if PeftType.UMEMA not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(name="umema", config_cls=UMEMAConfig, model_cls=UMEMAModel, prefix="lora_")
    if not getattr(PeftModel.create_or_update_model_card, "_umema_wrapped", False):
        PeftModel.create_or_update_model_card = _with_umema_model_card(PeftModel.create_or_update_model_card)
    install_file_checks()
