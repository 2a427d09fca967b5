"""peft_umema: LoRA + Uncertainty Modeling + External Memory Augmentation as a PEFT method.

`import peft_umema` registers the `UMEMA` peft type; then `peft.get_peft_model(model, UMEMAConfig(...))`,
`PeftConfig.from_pretrained` and `PeftModel.from_pretrained` work as for any built-in method.
"""

import logging

# bitsandbytes' CPU backend warns at import when an optional kernel package is missing; keep the CLI's stderr clean
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .training.callbacks import MemoryUpdateCallback
from .training.trainer import UMEMATrainer
from .tuner.config import UMEMAConfig
from .tuner.model import UMEMAModel
from .tuner.registration import register
from .uncertainty.calibration import calibrate_uncertainty

__version__ = "0.1.0"
__all__ = [
    "UMEMAConfig",
    "UMEMAModel",
    "UMEMATrainer",
    "MemoryUpdateCallback",
    "calibrate_uncertainty",
    "__version__",
]

register()
