"""`ParameterKind`: what one kind of constrained parameter declares, so that binding, the guards,
the fingerprint and the sharded backends ask it instead of knowing every kind.

A kind says which modules it matches, which of their tensors it constrains (`ConstrainedParameter`s)
and which it leaves free because they cannot move reference outputs once the others are
constrained, what it refuses and why (`check`), which parameter names it owns (names that are never
a target of their own, e.g. LoRA's `lora_A`/`lora_B`), and whether the row-sharded backends can run
it. Adding a kind is one module here and one `register_kind` call in `registry`; the shared test
matrix (`tests/test_kinds.py`) refuses a registered kind it does not run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trl_nullspace.projection.basis import SharedBases, SharedBasis
from trl_nullspace.projection.constrained import ConstrainedParameter


@dataclass
class Bound:
    """What a kind bound in one module: its constrained tensors, the names it leaves free, and the
    subspace targets it covered (a target no module covers means another model's subspace)."""

    constrained: list[ConstrainedParameter] = field(default_factory=list)
    free: list[str] = field(default_factory=list)
    covered: list[str] = field(default_factory=list)

    def constrain(
        self,
        kind: str,
        name: str,
        parameter: nn.Parameter,
        basis: SharedBasis,
        compute_dtype: torch.dtype,
        **view: Any,
    ) -> None:
        """Constrain `parameter` (named `name`) by `basis` if it trains (a frozen one cannot move);
        `view` says how it is seen as a matrix (`ConstrainedParameter`: flat, zero_anchor,
        transposed, expert, parameter_name)."""
        if parameter.requires_grad:
            view = {"flat": False, "zero_anchor": False} | view
            self.constrained.append(
                ConstrainedParameter(name, parameter, basis, compute_dtype=compute_dtype, kind=kind, **view)
            )


class ParameterKind(ABC):
    """One kind of constrained parameter (module docstring)."""

    name: str  # the registry's key, and each ConstrainedParameter's `kind`
    method: str  # the estimation method whose subspace it binds: "activation" or "gradient"
    shardable: bool = True  # False: split by something other than rows; frozen under DeepSpeed and FSDP2

    def owns(self, name: str) -> bool:
        """Whether the parameter or module `name` belongs to this kind's own machinery (never a target)."""
        return False

    @abstractmethod
    def matches(self, name: str, module: nn.Module, targets: set[str]) -> bool:
        """Whether this kind binds `module` (named `name`, canonical `targets` of the subspace)."""

    @abstractmethod
    def bind(self, name: str, module: nn.Module, bases: SharedBases, compute_dtype: torch.dtype) -> Bound:
        """The constrained tensors of a matched module, each with its basis from `bases`."""

    def check(self, model: nn.Module) -> None:
        """Refuse, with the cause and the fix, configurations of this kind the constraint cannot hold for."""
        return None
