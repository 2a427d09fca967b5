"""Configuration of a UMEMA adapter: LoRA plus Uncertainty Modeling (UM) and External Memory Augmentation (EMA)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from peft import LoraConfig
from peft.utils import PeftType

from ..constants import SUPPORTED_TASK_TYPES

CONTEXT_POOLING_OPTIONS = ("auto", "mean", "last")
TEMPERATURE_TRAINING_OPTIONS = ("detached", "joint")
# LoRA initialisations that only set the LoRA weights (tested); the others rewrite base weights or need data
SUPPORTED_LORA_INITS = (True, False, "gaussian")
# inherited LoRA variants UMEMA does not run: option -> value that means "off"
UNSUPPORTED_LORA_OPTIONS = {
    "use_dora": False,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "monteclora_config": None,
    "layer_replication": None,
    "arrow_config": None,
    "kasa_config": None,
    "use_bdlora": None,
    "target_parameters": None,
    "megatron_config": None,
    "trainable_token_indices": None,
    "lora_bias": False,
}


# fields added after adapters were first saved, and the behaviour of an adapter saved without them
FIELDS_ADDED_LATER = {"logit_scale": 1.0}


@dataclass
class UMEMAConfig(LoraConfig):
    """
    Configuration of a [`UMEMAModel`]: every LoRA option plus the UM and EMA modules of Ma et al. (PLOS ONE 2026),
    section 3. Defaults marked "paper" are fixed by the paper; the others are our reading (see `docs/method.md`).

    Example:
        ```py
        >>> import peft_umema
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base, peft_umema.UMEMAConfig(task_type="TOKEN_CLS", r=8))
        ```
    """

    use_um: bool = field(default=True, metadata={"help": "Enable Uncertainty Modeling (paper 3.1)."})
    use_ema: bool = field(default=True, metadata={"help": "Enable External Memory Augmentation (paper 3.2)."})

    # --- Uncertainty Modeling -------------------------------------------------------------------------------------
    guidance_dim: Optional[int] = field(
        default=None, metadata={"help": "Size g of the guidance space fusing K_d, K_t, K_s, K_p. None = hidden size."}
    )
    num_tasks: int = field(default=1, metadata={"help": "Number of task ids for the learnable task embedding K_t."})
    quantization_levels: int = field(
        default=16, metadata={"help": "Q: levels of the quantized (stabilized) token confidence q_i."}
    )
    propagation_layers: int = field(
        default=4, metadata={"help": "P: propagate token uncertainty through the last P backbone layers."}
    )
    propagation_rank: int = field(
        default=16, metadata={"help": "Projection size of the token-affinity maps used for propagation."}
    )
    uncertainty_memory_dim: int = field(
        default=64, metadata={"help": "Size of the compact uncertainty memory M_U = MLP([mu_U, s_U, E])."}
    )
    min_temperature: float = field(
        default=0.5, metadata={"help": "T_min of the calibration temperature T = T_min + softplus(...)."}
    )
    temperature_training: Literal["detached", "joint"] = field(
        default="detached",
        metadata={
            "help": "How training treats UM's temperature T. 'detached' (ours): the loss sees logits / T but no "
            "gradient reaches T, which is fitted on held-out data by calibrate_uncertainty (training CE would drive it "
            "to T_min). 'joint' (the paper read literally): T is trained with the rest."
        },
    )
    logit_scale: float = field(
        default=2.0,
        metadata={
            "help": "s: UM multiplies the head's logits by s before dividing by T, in training and prediction (ours). "
            "Trained jointly (the paper read literally), T sinks to T_min = 0.5 and so doubles the logits; that scale, "
            "not the memory, is what made the head learn faster (docs/method.md: LoRA with a fixed T = 0.5 gains as "
            "much). s keeps the scale, fixed, while T stays a calibrator fitted on held-out data. 1 = no scale "
            "(with temperature_training='joint': the paper's behaviour)."
        },
    )
    epistemic_from_memory: bool = field(
        default=True,
        metadata={
            "help": "Add the memory's novelty (1 - cosine similarity of the input's context summary to the nearest of "
            "`novelty_references` training examples) to the reported epistemic uncertainty, so it rises on inputs "
            "unlike the training data (ours). False = the propagation dispersion only (paper)."
        },
    )
    confidence_loss_weight: float = field(
        default=0.1,
        metadata={"help": "lambda_c: weight of the confidence term BCE(confidence, prediction is correct) in the loss."},
    )

    # --- External Memory Augmentation ------------------------------------------------------------------------------
    memory_size: int = field(default=256, metadata={"help": "J: number of key-value slots of the memory bank (paper)."})
    retrieval_temperature: float = field(
        default=1.0, metadata={"help": "tau_0: base retrieval temperature; tau = tau_0 * (1 + beta * uncertainty)."}
    )
    gate_bias_init: float = field(
        default=-2.0,
        metadata={"help": "Initial bias of the fusion gate; negative = memory starts as a small supplement."},
    )
    retrieval_top_k: Optional[int] = field(
        default=None,
        metadata={
            "help": "Read only the k best-matching slots (softmax over those k). None = dense read over all J slots "
            "(paper). Worth it for banks of many thousand slots."
        },
    )
    novelty_references: int = field(
        default=512,
        metadata={
            "help": "Context summaries of training examples (a uniform sample, taken by the final model when training "
            "ends) that the memory keeps as the reference of its novelty, besides its J slots (ours). More rows, a "
            "sharper novelty: 0.947 / 0.960 / 0.968 AUROC for 20 Newsgroups vs SemEval with 256 / 512 / 1000 "
            "(docs/method.md). 0 = no novelty."
        },
    )
    context_pooling: Literal["auto", "mean", "last"] = field(
        default="auto",
        metadata={
            "help": "Contextual summary c for the memory query: 'mean' (masked mean, encoders), 'last' (last "
            "non-pad token, causal LMs) or 'auto' (pick by architecture)."
        },
    )

    # --- Where the modules attach (auto-detected for HF models) -----------------------------------------------------
    head_module_name: Optional[str] = field(
        default=None,
        metadata={"help": "Name of the classification head module. None = auto ('score' or 'classifier')."},
    )
    layers_module_name: Optional[str] = field(
        default=None,
        metadata={"help": "Dotted name of the ModuleList of transformer blocks. None = auto-detect."},
    )

    base_model_type: Optional[str] = field(
        default=None,
        metadata={"help": "model_type of the backbone the adapter was created on (set automatically; checked on load)."},
    )

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs) -> dict:
        """Saved configs from before a field existed get the value they were trained with, not today's default."""
        loaded = super().from_json_file(path_json_file, **kwargs)
        for name, trained_with in FIELDS_ADDED_LATER.items():
            loaded.setdefault(name, trained_with)
        return loaded

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.UMEMA
        task = getattr(self.task_type, "value", self.task_type)
        if task not in SUPPORTED_TASK_TYPES:
            raise ValueError(
                f"UMEMAConfig(task_type={task!r}) is not supported: UMEMA calibrates classifiers, use "
                f"task_type='SEQ_CLS' (sequence classification) or 'TOKEN_CLS' (token classification)."
            )
        self._check_numbers()
        if self.context_pooling not in CONTEXT_POOLING_OPTIONS:
            raise ValueError(
                f"UMEMAConfig(context_pooling={self.context_pooling!r}): choose one of {CONTEXT_POOLING_OPTIONS}."
            )
        if self.temperature_training not in TEMPERATURE_TRAINING_OPTIONS:
            raise ValueError(f"UMEMAConfig(temperature_training={self.temperature_training!r}): choose one of "
                             f"{TEMPERATURE_TRAINING_OPTIONS}.")
        self._check_lora_variant()

    def _check_numbers(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"UMEMAConfig(r={self.r!r}): the LoRA rank must be a positive integer.")
        dropout = self.lora_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"UMEMAConfig(lora_dropout={dropout!r}): must be in [0, 1).")
        positive_ints = {
            "memory_size": self.memory_size,
            "num_tasks": self.num_tasks,
            "propagation_rank": self.propagation_rank,
            "uncertainty_memory_dim": self.uncertainty_memory_dim,
        }
        for name, value in positive_ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"UMEMAConfig({name}={value!r}): must be a positive integer.")
        references = self.novelty_references
        if not isinstance(references, int) or isinstance(references, bool) or references < 0:
            raise ValueError(f"UMEMAConfig(novelty_references={references!r}): must be an integer >= 0 (0 turns the "
                             "memory's novelty off).")
        if not isinstance(self.propagation_layers, int) or self.propagation_layers < 0:
            raise ValueError(
                f"UMEMAConfig(propagation_layers={self.propagation_layers!r}): must be an integer >= 0 "
                "(0 disables cross-layer propagation)."
            )
        for name in ("guidance_dim", "retrieval_top_k"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"UMEMAConfig({name}={value!r}): must be a positive integer or None.")
        if not isinstance(self.quantization_levels, int) or self.quantization_levels < 2:
            raise ValueError(
                f"UMEMAConfig(quantization_levels={self.quantization_levels!r}): must be an integer >= 2."
            )
        for name in ("min_temperature", "retrieval_temperature", "confidence_loss_weight", "gate_bias_init"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"UMEMAConfig({name}={value!r}): must be a finite number.")
        if not 0 < self.min_temperature < 1:
            raise ValueError(
                f"UMEMAConfig(min_temperature={self.min_temperature!r}): must be in (0, 1) so that T can start at 1."
            )
        if isinstance(self.logit_scale, bool) or not isinstance(self.logit_scale, (int, float)) \
                or not 0.1 <= self.logit_scale <= 10:
            raise ValueError(f"UMEMAConfig(logit_scale={self.logit_scale!r}): must be a number in [0.1, 10] (1 = no "
                             "scale).")
        if not 1e-3 <= self.retrieval_temperature <= 1e3:
            raise ValueError(
                f"UMEMAConfig(retrieval_temperature={self.retrieval_temperature!r}): must be in [1e-3, 1e3]; "
                "outside it the retrieval softmax over- or underflows."
            )
        if not 0 <= self.confidence_loss_weight <= 1e3:
            raise ValueError(f"UMEMAConfig(confidence_loss_weight={self.confidence_loss_weight!r}): must be in "
                             "[0, 1000].")
        if abs(self.gate_bias_init) > 50:
            raise ValueError(f"UMEMAConfig(gate_bias_init={self.gate_bias_init!r}): must be in [-50, 50] (the gate "
                             "is sigmoid(...): beyond that it is stuck at 0 or 1).")

    def _check_lora_variant(self) -> None:
        for name, off in UNSUPPORTED_LORA_OPTIONS.items():
            value = getattr(self, name, off)
            if value != off and not (off in (None, False) and not value):
                raise ValueError(
                    f"UMEMAConfig({name}={value!r}) is not supported: UMEMA runs plain LoRA adapters; leave {name} at "
                    f"its default ({off!r}) or use peft's LoraConfig for that variant."
                )
        init = self.init_lora_weights
        if init not in SUPPORTED_LORA_INITS:
            raise ValueError(
                f"UMEMAConfig(init_lora_weights={init!r}) is not supported; use one of {list(SUPPORTED_LORA_INITS)}."
            )
