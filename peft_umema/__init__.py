"""peft_umema: LoRA + Uncertainty Modeling + External Memory Augmentation as a PEFT method.

`import peft_umema` registers the `UMEMA` peft type; then `peft.get_peft_model(model, UMEMAConfig(...))`,
`PeftConfig.from_pretrained` and `PeftModel.from_pretrained` work as for any built-in method.
"""

from .tuner.config import UMEMAConfig
from .tuner.model import UMEMAModel
from .tuner.registration import register

__version__ = "0.1.0"
__all__ = ["UMEMAConfig", "UMEMAModel", "__version__"]

register()
