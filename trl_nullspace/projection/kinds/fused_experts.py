"""Fused mixture-of-experts weights (`projection.experts`): each expert's slice of `gate_up_proj` and
`down_proj` is its own matrix, constrained by the basis of the reference tokens routed to it. The
slices are views of one 3-D parameter, split by expert rather than by rows, so the row-sharded
backends cannot run them: under DeepSpeed and FSDP2 the experts are frozen, with a warning."""

from __future__ import annotations

import torch
from torch import nn

from trl_nullspace.projection.basis import SharedBases
from trl_nullspace.projection.experts import DOWN, GATE_UP, is_fused_experts, is_transposed_experts, slice_name
from trl_nullspace.projection.kinds.base import Bound, ParameterKind
from trl_nullspace.projection.targets import canonical_name


class FusedExpertsKind(ParameterKind):
    name = "fused_experts"
    method = "activation"
    shardable = False

    def matches(self, name: str, module: nn.Module, targets: set[str]) -> bool:
        return is_fused_experts(module)

    def bind(self, name: str, module: nn.Module, bases: SharedBases, compute_dtype: torch.dtype) -> Bound:
        """One constrained matrix per expert slice the subspace covers (an expert no reference token
        reached has an empty basis, and is constrained by it all the same)."""
        target = canonical_name(name)
        bound = Bound()
        for weight in (GATE_UP, DOWN):
            parameter = getattr(module, weight)
            for expert in range(parameter.shape[0]):
                key = slice_name(f"{target}.{weight}", expert)
                if key not in bases.subspace.targets:
                    continue
                bound.covered.append(key)
                bound.constrain(
                    self.name,
                    slice_name(f"{name}.{weight}", expert),
                    parameter,
                    bases.for_target(key),
                    compute_dtype,
                    transposed=is_transposed_experts(module),
                    expert=expert,
                    parameter_name=f"{name}.{weight}",
                )
        return bound
