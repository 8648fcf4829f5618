"""PEFT's LoRA forward without the multiply by a scaling of exactly 1.0: the same numbers, one tensor pass fewer.

PEFT's vanilla LoRA forward is `result + lora_B(lora_A(dropout(x))) * scaling`. With `lora_alpha == r` (the routed
adapter's default) the scaling is exactly 1.0, and `y * 1.0 == y` bit for bit in IEEE arithmetic (NaN, infinities and
signed zeros included), yet the multiply still reads and writes the whole `(batch, tokens, out_features)` output, and
autograd adds a second full pass for its gradient. On a small CPU model those passes are memory-bound and cost a
measurable share of a step (benchmarks/organism_step.py). `UnscaledLora` is a PEFT LoRA variant whose forward skips the
multiply when the scaling is exactly 1.0 and does the vanilla computation otherwise, so the output, the gradients and
every hook on `lora_A` / `lora_B` are unchanged. Merging and unmerging use PEFT's own `get_delta_weight`.

`install(layer, adapter)` sets it on one adapter of a plain `peft.tuners.lora.Linear` (a `torch.nn.Linear` base) that
has no other variant (DoRA etc.); any other layer (quantised, embedding, conv) keeps PEFT's forward.
Uses PEFT's variant hook (`LoraLayer.lora_variant`), which PEFT marks as subject to change: tests/test_adapter.py
checks the outputs and gradients against PEFT's vanilla forward bit for bit, so a change there shows.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora.layer import LoraVariant


class UnscaledLora(LoraVariant):
    """Vanilla LoRA; the scaling multiply is skipped when the scaling is exactly 1.0."""

    @staticmethod
    def init(module, adapter_name: str, **kwargs) -> None:
        return None

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        lora_a, lora_b = module.lora_A[active_adapter], module.lora_B[active_adapter]
        out = lora_b(lora_a(module.lora_dropout[active_adapter](x)))
        scaling = module.scaling[active_adapter]
        return result + (out if scaling == 1.0 else out * scaling)

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)


def install(layer, adapter: str) -> bool:
    """Use `UnscaledLora` for `adapter` on `layer` where it applies (see the module docstring); True if set."""
    if type(layer) is not LoraLinear or type(layer.get_base_layer()) is not torch.nn.Linear:
        return False
    if adapter not in layer.lora_A or adapter in layer.lora_variant:
        return False
    layer.lora_variant[adapter] = UnscaledLora()
    return True
