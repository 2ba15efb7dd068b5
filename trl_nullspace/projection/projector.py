"""`SubspaceProjector`: every constrained parameter of a model, bound to one `CapabilitySubspace`.

Binding walks the model once and lets the registered kinds of constrained parameter
(`projection.kinds`) say what each module contributes; the per-step operations (measure and
project the gradients, restore the anchors after the step, record and restore anchors for
checkpoints) then run over all of them alike. What one parameter's projection does, and why it is
exact, is `projection.constrained`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from trl_nullspace.estimation.subspace import CapabilitySubspace
from trl_nullspace.projection.basis import SharedBases
from trl_nullspace.projection.constrained import ConstrainedParameter, ProjectionStats, total_norm
from trl_nullspace.projection.kinds.registry import kinds_for, owned_by_a_kind, registered_kinds
from trl_nullspace.projection.placements import ShareHost


class SubspaceProjector:
    """All constrained parameters of a model, bound to one `CapabilitySubspace`.

    `free` are trainable parameters that cannot move the reference outputs once the others are
    constrained (LoRA `B` next to a constrained `A`); `unconstrained` are all other trainable
    parameters, which the trainer freezes or reports.
    """

    def __init__(self, constrained: list[ConstrainedParameter], free: list[str], unconstrained: list[str]):
        self.constrained = constrained
        self.free = free
        self.unconstrained = unconstrained

    @classmethod
    def bind(
        cls,
        model: nn.Module,
        subspace: CapabilitySubspace,
        compute_dtype: torch.dtype = torch.float32,
        offload_block_bytes: int | None = None,
        smaller_storage: bool = False,
        share_host: ShareHost | None = None,
        complement_dtype: torch.dtype = torch.float32,
    ) -> SubspaceProjector:
        """Match the subspace's targets to the model's trainable parameters, module by module: the
        first registered kind of the subspace's method that matches a module binds it
        (`projection.kinds.registry`); modules a kind owns (LoRA's own) are never targets.

        With `offload_block_bytes`, bases and anchors stay in host memory and are staged to the
        accelerator in column blocks of at most that size (`SharedBasis`). With `smaller_storage`,
        each basis' complement is kept instead where it is smaller (computed on the model's device).
        `share_host` makes the offloaded host copies (one per node: `node_memory.share_on_node`);
        `complement_dtype` is what the complements are stored in (`SharedBasis`).
        """
        device = next(model.parameters()).device
        bases = SharedBases(subspace, offload_block_bytes, smaller_storage, device, share_host, complement_dtype)
        kinds = kinds_for(subspace.method)
        targets = set(subspace.targets)
        constrained: list[ConstrainedParameter] = []
        free: set[str] = set()
        covered: set[str] = set()
        for name, module in model.named_modules():
            if owned_by_a_kind(name):
                continue
            kind = next((kind for kind in kinds if kind.matches(name, module, targets)), None)
            if kind is None:
                continue
            bound = kind.bind(name, module, bases, compute_dtype)
            constrained += bound.constrained
            free.update(bound.free)
            covered.update(bound.covered)
        missing = sorted(targets - covered)
        if missing:
            raise ValueError(
                f"The capability subspace names {len(missing)} layer(s) this model does not have, e.g. {missing[:3]}: "
                "it was estimated for another model."
            )
        if not constrained:
            raise ValueError(
                "The capability subspace constrains none of this model's trainable parameters "
                f"({subspace.method} method); check nullspace_target_modules and which parameters are trainable."
            )
        constrained_names = {item.parameter_name for item in constrained}
        unconstrained = [
            name
            for name, parameter in model.named_parameters()
            if parameter.requires_grad and name not in constrained_names and name not in free
        ]
        return cls(constrained, sorted(free), unconstrained)

    def on_row_shards(self) -> SubspaceProjector:
        """This projector without the kinds the row-sharded backends cannot run (`ParameterKind.shardable`:
        the fused experts' slices, split by expert, not by rows); their weights join `unconstrained`."""
        shardable = {name for name, kind in registered_kinds().items() if kind.shardable}
        dropped = [item for item in self.constrained if item.kind not in shardable]
        kept = [item for item in self.constrained if item.kind in shardable]
        names = sorted({item.parameter_name for item in dropped} | set(self.unconstrained))
        return SubspaceProjector(kept, self.free, names)

    def check_trainable_directions(self) -> None:
        """Fail before training if the subspace leaves no direction for any constrained parameter."""
        if all(item.rank >= item.dimension for item in self.constrained):
            raise ValueError(
                "The capability subspace is full rank for every constrained parameter, so no update is allowed. "
                "Lower nullspace_energy, raise nullspace_eigenvalue_threshold or set nullspace_max_rank."
            )

    def gradient_stats(self, apply: bool) -> ProjectionStats:
        """Measure (and with `apply`, remove) the gradients' components in the subspace."""
        stats = ProjectionStats()
        for item in self.constrained:
            if item.parameter.grad is None:
                continue
            stats.add(item.name, *item.remove_from_gradient(apply))
        return stats

    def nonfinite_gradients(self) -> list[str]:
        """Names of constrained parameters whose gradient holds NaN or inf.

        One fused norm and one device synchronisation for all parameters. A finite total norm means
        every entry is finite, short of entries near 1e19 overflowing fp32: a divergence anyway.
        """
        items = [item for item in self.constrained if item.parameter.grad is not None]
        if not items or bool(torch.isfinite(total_norm([item.parameter.grad for item in items]))):
            return []
        return [item.name for item in items if not torch.isfinite(item.parameter.grad).all()]

    def use_step_snapshots(self) -> None:
        """Project each step's change from a snapshot taken before it, with no anchors (`nullspace_step_snapshot`)."""
        for item in self.constrained:
            item.step_snapshots = True

    def take_previous(self) -> None:
        """With complement bases or step snapshots: record every constrained weight now (`take_previous`)."""
        for item in self.constrained:
            item.take_previous()

    def initialise_anchors(
        self,
        track_updates: bool,
        around: Callable[[nn.Parameter], AbstractContextManager] = lambda parameter: contextlib.nullcontext(),
    ) -> None:
        """Move LoRA `A` matrices into the null space; with `track_updates`, anchor every parameter.
        Each is set inside `around(parameter)` (ZeRO-3: gathered alone, `backends.zero.gather.gathered_alone`)."""
        for item in self.constrained:
            if item.zero_anchor or track_updates:
                with around(item.parameter):
                    item.reset_anchor()

    def anchors(self) -> dict[str, torch.Tensor]:
        """The recorded anchors by parameter name (empty where none is recorded)."""
        return {item.name: item.anchor for item in self.constrained if item.has_anchor}

    def restore_anchors(self, anchors: dict[str, torch.Tensor]) -> None:
        """Put back anchors saved by `anchors()`, e.g. from a checkpoint; names must match exactly."""
        recorded = {item.name for item in self.constrained if item.has_anchor}
        if recorded and not anchors:
            raise ValueError(
                "This checkpoint holds no anchors: it was saved with nullspace_step_snapshot (or the 'gradient' "
                "target). Resume it with the same setting."
            )
        if set(anchors) != recorded:
            missing, unknown = sorted(recorded - set(anchors)), sorted(set(anchors) - recorded)
            raise ValueError(f"Saved anchors do not match this model: missing {missing[:3]}, unknown {unknown[:3]}.")
        for item in self.constrained:
            if item.name in anchors:
                item.set_anchor(anchors[item.name])

    def project_gradients_in_backward(self) -> list[torch.utils.hooks.RemovableHandle]:
        """Project each constrained parameter's gradient as autograd produces it (`projected`), before
        any accumulation or reduction hook reads it; returns the hooks' handles."""
        return [item.parameter.register_hook(item.projected) for item in self.constrained]

    def enforce_anchors(self) -> torch.Tensor:
        """Project every constrained parameter back onto its anchor; returns the removed norm.

        The norm stays a device tensor: reading it would make the host wait for the accelerator
        after every optimizer step, so the trainer reads it only when it logs.
        """
        return total_norm([item.enforce_anchor() for item in self.constrained])
