"""The registered kinds of constrained parameter, in the order `SubspaceProjector.bind` tries them on
each module (the first that matches binds it): fused experts before dense weights (routers are
dense), LoRA before dense weights (a LoRA layer exposes its base layer's `weight`)."""

from __future__ import annotations

from torch import nn

from trl_nullspace.projection.kinds.base import ParameterKind
from trl_nullspace.projection.kinds.dense import DenseKind
from trl_nullspace.projection.kinds.flat import FlatParameterKind
from trl_nullspace.projection.kinds.fused_experts import FusedExpertsKind
from trl_nullspace.projection.kinds.lora import LoraKind

_KINDS: dict[str, ParameterKind] = {}


def register_kind(kind: ParameterKind) -> None:
    """Add `kind` after those registered so far; its name must be new."""
    if kind.name in _KINDS:
        raise ValueError(f"A parameter kind named {kind.name!r} is registered already.")
    _KINDS[kind.name] = kind


def registered_kinds() -> dict[str, ParameterKind]:
    return dict(_KINDS)


def kinds_for(method: str) -> list[ParameterKind]:
    """The kinds that bind a subspace of estimation `method`, in trying order."""
    return [kind for kind in _KINDS.values() if kind.method == method]


def owned_by_a_kind(name: str) -> bool:
    """Whether a parameter or module name is some kind's own machinery (e.g. LoRA's), never a target."""
    return any(kind.owns(name) for kind in _KINDS.values())


def check_kinds(model: nn.Module) -> None:
    """Every kind's refusals on `model` (`ParameterKind.check`)."""
    for kind in _KINDS.values():
        kind.check(model)


for _kind in (FusedExpertsKind(), LoraKind(), DenseKind(), FlatParameterKind()):
    register_kind(_kind)
