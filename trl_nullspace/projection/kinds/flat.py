"""The gradient method's parameters (OGPSA): each target parameter, flattened to one row, is kept out
of a low-rank basis of reference-set gradients of that same parameter. The basis spans whole
flattened gradients, not a layer's inputs, so there are no rows to shard it by: only one process,
DDP and DeepSpeed (whose fragments are slices of the flattened parameter) run it."""

from __future__ import annotations

import torch
from torch import nn

from trl_nullspace.projection.basis import SharedBases
from trl_nullspace.projection.kinds.base import Bound, ParameterKind
from trl_nullspace.projection.targets import canonical_name


class FlatParameterKind(ParameterKind):
    name = "flat"
    method = "gradient"

    def matches(self, name: str, module: nn.Module, targets: set[str]) -> bool:
        return any(canonical_name(_full(name, own)) in targets for own, _ in module.named_parameters(recurse=False))

    def bind(self, name: str, module: nn.Module, bases: SharedBases, compute_dtype: torch.dtype) -> Bound:
        bound = Bound()
        for own, parameter in module.named_parameters(recurse=False):
            full = _full(name, own)
            target = canonical_name(full)
            if target not in bases.subspace.targets:
                continue
            bound.covered.append(target)
            bound.constrain(self.name, full, parameter, bases.for_target(target), compute_dtype, flat=True)
        return bound


def _full(module_name: str, own: str) -> str:
    """A module's own parameter's full name (the root module's name is empty)."""
    return f"{module_name}.{own}" if module_name else own
