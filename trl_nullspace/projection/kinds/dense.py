"""Dense weights: `nn.Linear`, transformers' `Conv1D` (stored in × out, used through its transpose)
and the routers of fused mixture-of-experts layers. The whole weight is constrained by the basis of
its layer's input; biases stay out (they shift every output, reference ones included) and are
frozen with the other untargeted parameters."""

from __future__ import annotations

import torch
from torch import nn

from trl_nullspace.projection.basis import SharedBases
from trl_nullspace.projection.kinds.base import Bound, ParameterKind
from trl_nullspace.projection.targets import canonical_name, is_transposed_linear


class DenseKind(ParameterKind):
    name = "dense"
    method = "activation"

    def matches(self, name: str, module: nn.Module, targets: set[str]) -> bool:
        return canonical_name(name) in targets and isinstance(getattr(module, "weight", None), nn.Parameter)

    def bind(self, name: str, module: nn.Module, bases: SharedBases, compute_dtype: torch.dtype) -> Bound:
        target = canonical_name(name)
        bound = Bound(covered=[target])
        basis, transposed = bases.for_target(target), is_transposed_linear(module)
        bound.constrain(self.name, f"{name}.weight", module.weight, basis, compute_dtype, transposed=transposed)
        return bound
