"""How a null-space trainer projects sharded weights: which projector steps the master weights and
gradients under DeepSpeed ZeRO and FSDP2, and where in the optimizer step each projection runs.

`ShardedProjectionMixin` is the part of `NullSpaceTrainerMixin` that chooses between the ZeRO
projectors (`zero`: after DeepSpeed's step; `zero_in_step`: inside ZeRO-1/2's; `zero3_step`: the
gradient at the start of ZeRO-3's) and FSDP2's row shards (`fsdp`), builds them once the backend
has sharded the model, and checks after every optimizer step that what should have run inside
DeepSpeed's step did. Estimating and binding the subspace, reporting and checkpoints stay in
`trl_nullspace.training.mixin`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.utils import logging

from trl_nullspace.backends.fsdp2 import RowShardProjector
from trl_nullspace.backends.zero.in_step import InStepZeroProjector, supports_in_step_projection
from trl_nullspace.backends.zero.master import RowExchangeZeroProjector, ZeroMasterProjector
from trl_nullspace.backends.zero.step_start import Zero3GradientProjector, supports_step_start_projection
from trl_nullspace.projection.projector import SubspaceProjector

logger = logging.get_logger(__name__)

ShardedProjector = ZeroMasterProjector | InStepZeroProjector | RowExchangeZeroProjector | RowShardProjector


class ShardedProjectionMixin:
    """The sharded backends' projectors, for `NullSpaceTrainerMixin` (module docstring). Reads the
    Trainer's `args`, `accelerator`, `model` and the mixin's `nullspace_projector`."""

    _sharded_master_projector: ShardedProjector | None = None
    _zero3_gradients: Zero3GradientProjector | None = None

    def _reset_sharded_projection(self, projector: SubspaceProjector) -> None:
        """Forget the sharded projectors of a previous subspace (built again as training begins, or
        when first needed) and, under DeepSpeed, hook the gradient projection into backward until
        DeepSpeed's step is found to take it (`_build_zero_projector`)."""
        target = self.args.nullspace_projection_target
        for stepping in (self._sharded_master_projector, self._zero3_gradients):
            if isinstance(stepping, InStepZeroProjector | Zero3GradientProjector):
                stepping.remove()  # it would project with the old subspace
        self._sharded_master_projector = None
        self._zero3_gradients = None
        # DeepSpeed reduces gradients in its own hooks and steps inside backward: the gradient target
        # projects each micro-batch's gradient as autograd produces it, before those hooks read it
        # (unless DeepSpeed's step can project each rank's partition once: `_build_zero_projector`).
        self._remove_gradient_hooks()
        if self.is_deepspeed_enabled and target in ("gradient", "both"):
            self._gradient_hooks = projector.project_gradients_in_backward()

    def _sharded_projector(self) -> ShardedProjector:
        """The projector of sharded master weights, built once DeepSpeed or FSDP2 has sharded them
        (at the latest when training begins: under ZeRO-1/2 it projects inside DeepSpeed's step)."""
        if self._sharded_master_projector is None:
            constrained = self.nullspace_projector.constrained
            device = self.accelerator.device
            row_exchange = self.args.nullspace_offload or self.args.nullspace_basis_storage == "smaller"
            zero_optimizer = self._zero_optimizer()
            if zero_optimizer is not None and supports_in_step_projection(zero_optimizer):
                target = self.args.nullspace_projection_target
                self._sharded_master_projector = InStepZeroProjector(
                    constrained,
                    device,
                    zero_optimizer,
                    row_exchange,
                    update=target != "gradient",
                    gradient=target != "update",
                )
            elif self.is_deepspeed_enabled and row_exchange:  # refuses ZeRO-1/2 weights: every row would travel
                self._sharded_master_projector = RowExchangeZeroProjector(constrained, device)
            elif self.is_deepspeed_enabled:
                self._sharded_master_projector = ZeroMasterProjector(constrained, device)
            else:
                self._sharded_master_projector = RowShardProjector(self.model, constrained)
        return self._sharded_master_projector

    def _build_zero_projector(self) -> None:
        """Under DeepSpeed, build the projector of the master weights as training begins, on every
        process alike: under ZeRO-1/2 it must hook into DeepSpeed's step before the first one, and
        finding the ranks' partitions is a collective. Where the gradient is projected in DeepSpeed's
        step too (once per step, each rank its fragment: ZeRO-1/2 inside it, ZeRO-3 at its start),
        the hooks in backward are removed."""
        if not self.is_deepspeed_enabled:
            return
        target = self.args.nullspace_projection_target
        sharded = self._sharded_projector()
        if isinstance(sharded, InStepZeroProjector) and sharded.projects_gradients:
            self._remove_gradient_hooks()
        zero3_optimizer = self._zero_optimizer(stages=(3,))
        if target != "update" and zero3_optimizer is not None and supports_step_start_projection(zero3_optimizer):
            engine = self.accelerator.deepspeed_engine_wrapped.engine
            self._zero3_gradients = Zero3GradientProjector(sharded, zero3_optimizer, engine.fp16_enabled())
            self._remove_gradient_hooks()
        micro_batches = self.args.gradient_accumulation_steps
        if self._gradient_hooks and micro_batches > 1:
            logger.warning(
                "trl-nullspace: the gradient projection (nullspace_projection_target=%r) runs on every rank's whole "
                "gradient at each of the %d micro-batches of a step, before ZeRO divides anything: that many times "
                "one device's gradient projection per step, per rank (counted for 7B in docs/results/memory.md). "
                "Under ZeRO-1/2 in bf16 or fp32, and ZeRO-3, it runs once per step in DeepSpeed's step instead; the "
                "'update' target projects once per step, each rank its own rows; FSDP2 projects the gradient once "
                "per step.",
                target,
                micro_batches,
            )

    def _remove_gradient_hooks(self) -> None:
        """Remove the gradient projection's hooks in backward (`project_gradients_in_backward`), if any."""
        for handle in getattr(self, "_gradient_hooks", []):
            handle.remove()
        self._gradient_hooks = []

    def _zero_optimizer(self, stages: tuple[int, ...] = (1, 2)) -> Any | None:
        """DeepSpeed's ZeRO optimizer, where this run has one of those stages."""
        if not self.is_deepspeed_enabled or self.accelerator.state.deepspeed_plugin.zero_stage not in stages:
            return None
        return self.accelerator.deepspeed_engine_wrapped.engine.optimizer

    def _take_previous_on_shards(self) -> None:
        """With complement bases: each rank records its own rows of the weights, once sharded."""
        sharded = self._sharded_projector()
        if isinstance(sharded, RowShardProjector | RowExchangeZeroProjector | InStepZeroProjector):
            sharded.take_previous()

    def _project_shards_after_step(self) -> torch.Tensor | None:
        """After each optimizer step: check that the projections inside DeepSpeed's step ran, and
        project the sharded masters where they run after it. Returns the norm the update projection
        removed on this rank's rows (None under the `gradient` target)."""
        if self._zero3_gradients is not None:
            self._zero3_gradients.check_ran()
        if self.args.nullspace_projection_target == "gradient":
            if isinstance(self._sharded_master_projector, InStepZeroProjector):
                self._sharded_master_projector.enforce_anchors()  # checks the gradient was projected in the step
            return None
        return self._sharded_projector().enforce_anchors()

    def _sharded_summary(self) -> str:
        """Where DeepSpeed's projections run and what they exchange, once built (for the start summary)."""
        built = [self._sharded_master_projector, self._zero3_gradients] if self.is_deepspeed_enabled else []
        return "".join(f" {part.summary()}." for part in built if part is not None)
