"""What DeepSpeed ZeRO and FSDP2 share: weights split by output rows, and the options they refuse.

Both backends project each rank's rows of the fp32 masters. A row split needs a weight stored
out × in (transformers' `Conv1D` is stored transposed), whole parameters (fused experts are split by
expert, not by rows: they are frozen instead), and it never shows one process the whole gradient
(so `nullspace_scale_learning_rate` cannot measure what the projection keeps). Re-estimating the
subspace in training would need the sharded anchors rebuilt in place: not supported yet.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Protocol

import torch
from torch import nn

from trl_nullspace.backends.base import ConstraintBackend
from trl_nullspace.config import MEASURED_RATE_RATIO
from trl_nullspace.projection.projector import SubspaceProjector
from trl_nullspace.projection.targets import is_transposed_linear


class ShardProjector(Protocol):
    """The sharded masters' projector of a backend: what every one of them offers."""

    def enforce_anchors(self) -> torch.Tensor: ...

    def full_anchors(self) -> dict[str, torch.Tensor]: ...


class ShardedBackend(ConstraintBackend):
    """A backend that projects row shards of the fp32 masters (module docstring)."""

    def check_supported(self, model: nn.Module, trainer_name: str) -> None:
        super().check_supported(model, trainer_name)
        if self.args.nullspace_scale_learning_rate:
            raise NotImplementedError(
                f"{trainer_name} supports nullspace_scale_learning_rate on one process and under DDP only: under "
                f"{self.name} the whole gradient is never seen in one place to measure what the projection keeps. "
                "Turn it off and set the learning rate yourself (the default needed "
                f"{MEASURED_RATE_RATIO:g}x plain TRL's rate for the same refusal; docs/results/real_tuning.md)."
            )
        conv1d = [name for name, module in model.named_modules() if is_transposed_linear(module)]
        if conv1d:
            raise NotImplementedError(
                f"{trainer_name} does not support {self.name} on models with transformers' Conv1D layers (GPT-2 "
                f"style, e.g. {conv1d[0]}): they store the weight transposed, and the sharded projection works on "
                "output rows. Train this model with DDP or on one device."
            )
        if self.args.nullspace_refresh_steps is not None:
            raise NotImplementedError(f"nullspace_refresh_steps is not supported under {self.name} yet.")

    def supported(self, projector: SubspaceProjector) -> SubspaceProjector:
        """Without the kinds split by something other than rows (the experts' slices, split by expert)."""
        return projector.on_row_shards()

    # The optimizer holds flat or sharded copies of the weights: the shards' projector maps every
    # constrained weight to those copies itself, or fails.
    optimizer_steps_module_parameters = False

    @property
    @abstractmethod
    def shards(self) -> ShardProjector | None:
        """The sharded masters' projector, once built (as training begins)."""

    def anchors_at_save(self) -> dict[str, torch.Tensor]:
        """Each rank keeps its anchor rows only, once the shards' projector is built: gathered (collective)."""
        return self.shards.full_anchors() if self.shards is not None else self.projector.anchors()
