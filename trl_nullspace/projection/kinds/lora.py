"""LoRA (Mou et al.): with each adapter's `A` kept in the null space of the layer's reference inputs,
`B A K = 0` holds exactly whatever `B` learns, so `A` is constrained and `B` is left free. The base
weight stays frozen under the adapter. This holds only while the adapter adds `s·B A` to the output
from `B = 0`: DoRA (which rescales each output row by a norm that moves as `B` trains) and adapters
whose `B` is not zero at set-up are refused. The names under `lora_` are the adapter's own, never a
target of their own."""

from __future__ import annotations

import torch
from torch import nn

from trl_nullspace.projection.basis import SharedBases
from trl_nullspace.projection.kinds.base import Bound, ParameterKind
from trl_nullspace.projection.targets import canonical_name, is_lora_layer


class LoraKind(ParameterKind):
    name = "lora"
    method = "activation"

    def owns(self, name: str) -> bool:
        return ".lora_" in name

    def matches(self, name: str, module: nn.Module, targets: set[str]) -> bool:
        return is_lora_layer(module) and canonical_name(name) in targets

    def bind(self, name: str, module: nn.Module, bases: SharedBases, compute_dtype: torch.dtype) -> Bound:
        target = canonical_name(name)
        bound = Bound(covered=[target])
        for adapter, lora_a in module.lora_A.items():
            if lora_a.weight.requires_grad:  # with A trained in the null space, B cannot move reference outputs
                basis, own = bases.for_target(target), f"{name}.lora_A.{adapter}.weight"
                bound.constrain(self.name, own, lora_a.weight, basis, compute_dtype, zero_anchor=True)
                bound.free.append(f"{name}.lora_B.{adapter}.weight")
        return bound

    def check(self, model: nn.Module) -> None:
        dora, nonzero_b = [], []
        for name, module in model.named_modules():
            if any(getattr(module, "use_dora", {}).values()):
                dora.append(name)
            if is_lora_layer(module):
                for adapter, lora_b in module.lora_B.items():
                    if lora_b.weight.requires_grad and bool(lora_b.weight.detach().abs().max() > 0):
                        nonzero_b.append(f"{name} ({adapter})")
        if dora:
            raise ValueError(
                f"DoRA adapters (use_dora=True, e.g. {dora[0]}) cannot be kept out of the capability subspace: DoRA "
                "divides each output row by the norm of W + s·B·A, which changes as B trains, so outputs on the "
                "reference data move. Use plain LoRA (use_dora=False) or full fine-tuning."
            )
        if nonzero_b:
            raise ValueError(
                f"LoRA adapters whose B is not zero at the start ({nonzero_b[:2]}): PiSSA, OLoRA, LoftQ, "
                "init_lora_weights=False or a loaded adapter already change the model, and constraining their A "
                "would change it again before training. Start from init_lora_weights=True (B = 0), or merge the "
                "adapter into the model (merge_and_unload) and train a new one."
            )
