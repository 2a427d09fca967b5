"""Quantized (bitsandbytes) backbones: what UMEMA does to their layers so that QLoRA trains correctly.

bitsandbytes 0.50.x has a CPU-only bug. On processors with AVX512-BF16, the first forward pass of a 4-bit layer
in eval mode on an input that does not require grad (any `torch.no_grad()` evaluation) repacks the layer's weight
into an inference-only layout, and keeps it: from then on no gradient flows through that layer, so the LoRA
weights on it stop training (their `.grad` stays None) while the loss still falls through the head. The same
repacking crashes on layers whose `in_features` is not a multiple of 64. `prepare_quantized_layers` turns that
repacking off on every 4-bit layer and undoes it where it already happened. On GPUs (and CPUs without
AVX512-BF16) the flag is never consulted, so the call changes nothing there.
"""

from __future__ import annotations

import sys

from torch import nn

# the bitsandbytes attribute that enables the inference repacking (bitsandbytes/nn/modules.py, Linear4bit)
_REPACK_FLAG = "support_avx512bf16_for_cpu"


def prepare_quantized_layers(model: nn.Module) -> int:
    """Make the bitsandbytes 4-bit layers of `model` keep their trainable weight layout; returns how many.

    Safe on any model: without bitsandbytes imported, or without 4-bit layers, it does nothing and returns 0 (it
    never imports bitsandbytes itself: a model holding its layers has imported it already). Call it once after
    loading a 4-bit backbone and before any evaluation; calling it later, or again, is fine too: layers already
    repacked by an evaluation are converted back, so training after that evaluation gets its gradients again.
    Outputs of the layers are unchanged up to the 4-bit kernel's rounding (the repacked path computes in bf16).
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return 0
    linear4bit = getattr(getattr(bnb, "nn", None), "Linear4bit", None)
    if linear4bit is None:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, linear4bit):
            setattr(module, _REPACK_FLAG, False)
            _undo_cpu_repacking(module, bnb)
            count += 1
    return count


def _undo_cpu_repacking(layer: nn.Module, bnb) -> None:
    """Convert a weight that an earlier eval pass repacked for CPU inference back to the standard 4-bit layout."""
    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None or not getattr(quant_state, "packing_format_for_cpu", False):
        return
    inverse = getattr(bnb.functional, "_convert_weight_packed_for_cpu_inverse", None)
    if inverse is None:  # a bitsandbytes that packs but cannot unpack: refuse rather than train without gradients
        raise RuntimeError(
            f"This bitsandbytes ({getattr(bnb, '__version__', '?')}) repacked a 4-bit layer for CPU inference and "
            "offers no way back; call peft_umema.tuner.quantization.prepare_quantized_layers(model) before the first "
            "evaluation, or reload the backbone."
        )
    weight.data, weight.quant_state = inverse(weight.data, quant_state)
    if getattr(layer, "quant_state", None) is not None:
        layer.quant_state = weight.quant_state
