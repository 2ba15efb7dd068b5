"""`ConstraintBackend`: the one interface through which a trainer runs the projections, whatever
distributes the training.

On one process and under DDP every rank holds whole weights and whole (all-reduced) gradients, so
the projector works on the parameters themselves (`local`). DeepSpeed ZeRO (`zero/`) and FSDP2
(`fsdp2`) hold each weight's fp32 master as shards: their backends reach those shards instead, and
refuse the options they cannot honour. A trainer detects its backend once (`selection.backend_for`)
and then calls the same moments on every backend, in this order:

- `supported` and `bind`, each time a subspace is bound (set-up, resume, refresh);
- `begin_training`, as training begins: the model is wrapped or sharded and the optimizer exists;
- `before_step`, once per optimizer step with the gradients synchronised (under DeepSpeed the
  engine has already stepped by then);
- `after_step`, right after `optimizer.step()`;
- `anchors_at_save`, at each checkpoint.

Invariant, under the `update` and `both` targets: after `after_step` every constrained weight's change
since binding lies outside the subspace (up to the projection dtype), on every backend (the
`gradient` target alone holds it only for optimizers that step along the projected gradient).
Adding a backend is a subclass and one line in `backend_for`; the trainer's code does not change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from trl_nullspace.config import NullSpaceArguments
from trl_nullspace.projection.constrained import ProjectionStats
from trl_nullspace.projection.projector import SubspaceProjector


class ConstraintBackend(ABC):
    """Runs a bound `SubspaceProjector` at the moments of a training step (module docstring)."""

    name: str  # as messages and the start summary say it
    # Whether the optimizer steps the module's own parameters, which the trainer then checks against
    # the constrained ones (`guards.check_optimizer_steps_what_is_constrained`) as training begins.
    optimizer_steps_module_parameters: bool

    def __init__(self, args: NullSpaceArguments, accelerator: Any):
        self.args = args
        self.accelerator = accelerator
        self._projector: SubspaceProjector | None = None

    @property
    def projector(self) -> SubspaceProjector:
        if self._projector is None:
            raise RuntimeError("No subspace is bound yet: the trainer binds one at set-up (ConstraintBackend.bind).")
        return self._projector

    @property
    def projects_gradients(self) -> bool:
        return self.args.nullspace_projection_target in ("gradient", "both")

    @property
    def projects_updates(self) -> bool:
        return self.args.nullspace_projection_target in ("update", "both")

    # Whether this backend splits the bases over the ranks when `nullspace_shard_bases` asks, whether it
    # projects each step's change from a snapshot when `nullspace_step_snapshot` asks, and whether its
    # projections have been checked with complements stored in bf16 (`nullspace_complement_dtype`).
    shards_bases = False
    takes_step_snapshots = False
    low_precision_complements = False
    # Whether the unset storage options choose the lean storage here (`storage_choice`): where it is built and
    # tested, and the anchored whole bases' memory is what keeps large models out. What they became here, for
    # the start summary.
    lean_storage_built = False
    chosen_storage: tuple[str, ...] = ()

    def check_supported(self, model: nn.Module, trainer_name: str) -> None:
        """Refuse, with the cause and the fix, what this backend cannot constrain (at set-up); backends
        extend it with their own refusals."""
        if self.args.nullspace_shard_bases and not self.shards_bases:
            raise NotImplementedError(
                f"{trainer_name} supports nullspace_shard_bases under FSDP2 and DeepSpeed ZeRO-3 only (this run: "
                f"{self.name}): on one process or under DDP each rank projects whole weights with whole bases. Turn "
                "it off, or take the bases off the accelerator with nullspace_offload."
            )
        if self.args.nullspace_complement_dtype != "float32" and not self.low_precision_complements:
            raise NotImplementedError(
                f"{trainer_name} supports nullspace_complement_dtype='{self.args.nullspace_complement_dtype}' on one "
                f"process, DDP, FSDP2 and DeepSpeed ZeRO-3 only (this run: {self.name}). Keep the complements in "
                "float32."
            )
        if self.args.nullspace_step_snapshot and not self.takes_step_snapshots:
            raise NotImplementedError(
                f"{trainer_name} supports nullspace_step_snapshot on one process, DDP and FSDP2 only (this run: "
                f"{self.name}): its projections of the masters keep anchors. Turn it off."
            )

    def supported(self, projector: SubspaceProjector) -> SubspaceProjector:
        """The part of `projector` this backend can run (the rest is frozen by the trainer, with a warning)."""
        return projector

    def bind(self, projector: SubspaceProjector) -> None:
        """Constrain with `projector` from now on, forgetting what was built for an earlier subspace."""
        self._projector = projector

    @abstractmethod
    def begin_training(self, model: nn.Module) -> None:
        """Build what needs the wrapped or sharded model, once training begins."""

    @abstractmethod
    def take_previous(self) -> None:
        """With complement bases (as training begins) or step snapshots (before each step): record the weights
        (each rank its own rows) that the next update projection keeps the change from."""

    @abstractmethod
    def before_step(self, model: nn.Module, step: int, measure: bool) -> ProjectionStats | None:
        """Once per optimizer step, gradients synchronised: project them where this backend does it
        here; returns what the projection removed where it is measured here (`measure`: the step is
        logged or the learning rate is being calibrated), else None."""

    @abstractmethod
    def after_step(self) -> torch.Tensor | None:
        """Right after `optimizer.step()`: project the update; returns the norm removed on this
        rank's rows (None under the `gradient` target)."""

    def anchors_at_save(self) -> dict[str, torch.Tensor]:
        """Every anchor, whole, for a checkpoint (a collective where they are sharded)."""
        return self.projector.anchors()

    def reload_converted_weights(self, model: nn.Module, checkpoint: str) -> list[str]:
        """Weights the Trainer's checkpoint load skipped and this backend restores; their names."""
        return []

    def summary(self) -> str:
        """Where this backend's projections run, for the start summary ('' where nothing is worth saying)."""
        return self.chosen_storage_summary()

    def chosen_storage_summary(self) -> str:
        if not self.chosen_storage:
            return ""
        return f" Storage chosen for {self.name} (options left unset): {', '.join(self.chosen_storage)}."
