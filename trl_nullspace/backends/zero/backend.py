"""`ZeroBackend`: DeepSpeed ZeRO-1/2/3, and which projector steps its masters and gradients where.

Under DeepSpeed the engine reduces gradients in its own hooks and steps inside backward, so the
trainer never sees a gradient before the step. The projections run in one of three places:
- inside ZeRO-1/2's step (`in_step`), each rank its own fragment of the reduced gradient and of
  the masters, once per step (bf16/fp32 optimizers whose step this code has checked);
- at the start of ZeRO-3's step (`step_start`), the gradient, each rank its partition, once per
  step; the masters after the step (`master`);
- around the step otherwise, or with `nullspace_deepspeed_projection='around_step'`: the gradient
  by a hook in backward (every rank its whole gradient, at every micro-batch), the masters after
  the step (`master`; `RowExchangeZeroProjector` with offloaded or complement bases).
After every step the backend checks that what should have run inside DeepSpeed's step did.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from trl_nullspace.backends.sharded import ShardedBackend
from trl_nullspace.backends.zero.in_step import InStepZeroProjector, supports_in_step_projection
from trl_nullspace.backends.zero.master import RowExchangeZeroProjector, ZeroMasterProjector
from trl_nullspace.backends.zero.step_start import Zero3GradientProjector, supports_step_start_projection
from trl_nullspace.config import NullSpaceArguments
from trl_nullspace.projection.constrained import ProjectionStats
from trl_nullspace.projection.projector import SubspaceProjector

logger = logging.get_logger(__name__)

MasterProjector = ZeroMasterProjector | InStepZeroProjector | RowExchangeZeroProjector


class ZeroBackend(ShardedBackend):
    """DeepSpeed ZeRO's partitioned fp32 masters (module docstring)."""

    name = "DeepSpeed"
    # ZeRO-3 (`check_supported` refuses both under ZeRO-1/2, which keep only the bases their partition reads).
    shards_bases = True
    takes_step_snapshots = True

    def __init__(self, args: NullSpaceArguments, accelerator: Any):
        super().__init__(args, accelerator)
        self._master: MasterProjector | None = None
        self._zero3_gradients: Zero3GradientProjector | None = None
        self._gradient_hooks: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def shards(self) -> MasterProjector | None:
        return self._master

    @property
    def row_exchange(self) -> bool:
        """Offloaded, complement or split bases: the split rows' values travel instead of coefficients."""
        args = self.args
        return (
            args.nullspace_offload
            or args.nullspace_basis_storage == "smaller"
            or args.nullspace_shard_bases
            or args.nullspace_step_snapshot
        )

    @property
    def low_precision_complements(self) -> bool:
        """ZeRO-3, whose row-exchange projector reads every complement in fp32 and applies it to each step's change
        and to the gradient only (never to accumulated weights). ZeRO-1/2's in-step projection is untested with
        them."""
        return self.accelerator.state.deepspeed_plugin.zero_stage == 3

    @property
    def lean_storage_built(self) -> bool:
        """ZeRO-3 with its projections in DeepSpeed's step, where the step snapshots are taken."""
        stage = self.accelerator.state.deepspeed_plugin.zero_stage
        return stage == 3 and self.args.nullspace_deepspeed_projection == "in_step"

    def check_supported(self, model: nn.Module, trainer_name: str) -> None:
        super().check_supported(model, trainer_name)
        stage = self.accelerator.state.deepspeed_plugin.zero_stage
        if self.args.nullspace_shard_bases and stage != 3:
            raise NotImplementedError(
                f"{trainer_name} splits the bases over the ranks (nullspace_shard_bases) under ZeRO-3 and FSDP2 (this "
                f"run: ZeRO-{stage}). Turn it off: under ZeRO-1/2 each rank already keeps only the bases its "
                "partition reads, with no communication."
            )
        if self.args.nullspace_step_snapshot and stage != 3:
            raise NotImplementedError(
                f"{trainer_name} supports nullspace_step_snapshot under DeepSpeed ZeRO-3 only (this run: "
                f"ZeRO-{stage}; also one process, DDP and FSDP2): under ZeRO-1/2 the masters are projected with "
                "anchors. Turn it off, or use ZeRO-3."
            )
        if self.args.nullspace_step_snapshot and self.args.nullspace_deepspeed_projection != "in_step":
            raise NotImplementedError(
                f"{trainer_name} takes the step snapshots at the start of DeepSpeed's step, and "
                "nullspace_deepspeed_projection='around_step' keeps the projections out of it. Use 'in_step' (the "
                "default), or turn nullspace_step_snapshot off."
            )
        if self.row_exchange and self.args.nullspace_method != "activation":
            option = next(
                name
                for name, on in (
                    ("nullspace_offload", self.args.nullspace_offload),
                    ("nullspace_shard_bases", self.args.nullspace_shard_bases),
                    ("nullspace_step_snapshot", self.args.nullspace_step_snapshot),
                    ("nullspace_basis_storage='smaller'", True),
                )
                if on
            )
            raise NotImplementedError(
                f"{trainer_name} supports {option} under DeepSpeed with the activation method only (this run: "
                f"nullspace_method={self.args.nullspace_method!r}): its projection exchanges the weight rows that "
                "partitions split, which for the gradient method's single-row matrices is every row. Use the "
                "activation method with it, or turn it off."
            )

    def bind(self, projector: SubspaceProjector) -> None:
        """Forget the projectors of a previous subspace (built again as training begins) and hook the
        gradient projection into backward, before DeepSpeed's reduction hooks read the gradient, until
        `begin_training` finds that DeepSpeed's step can project each rank's partition once instead."""
        super().bind(projector)
        for stepping in (self._master, self._zero3_gradients):
            if isinstance(stepping, InStepZeroProjector | Zero3GradientProjector):
                stepping.remove()  # it would project with the old subspace
        self._master = None
        self._zero3_gradients = None
        self._remove_gradient_hooks()
        if self.projects_gradients:
            self._gradient_hooks = projector.project_gradients_in_backward()

    def begin_training(self, model: nn.Module) -> None:
        """Build the masters' projector on every process alike (finding the partitions is a collective;
        under ZeRO-1/2 it must hook into DeepSpeed's step before the first one). Where the gradient is
        projected in DeepSpeed's step, the hooks in backward are removed."""
        in_step = self.args.nullspace_deepspeed_projection == "in_step"
        self._master = self._build_master(in_step)
        if isinstance(self._master, InStepZeroProjector) and self._master.projects_gradients:
            self._remove_gradient_hooks()
        zero3_optimizer = self._zero_optimizer(stages=(3,))
        snapshots = self.args.nullspace_step_snapshot
        if in_step and (self.projects_gradients or snapshots) and zero3_optimizer is not None:
            if supports_step_start_projection(zero3_optimizer):
                engine = self.accelerator.deepspeed_engine_wrapped.engine
                self._zero3_gradients = Zero3GradientProjector(
                    self._master, zero3_optimizer, engine.fp16_enabled(), self.projects_gradients, snapshots
                )
                if self.projects_gradients:
                    self._remove_gradient_hooks()
            elif snapshots:
                raise NotImplementedError(
                    "This DeepSpeed version's ZeRO-3 optimizer lacks the local-gradient API the start of its step is "
                    "reached through, so no step snapshot can be taken before it steps. Turn nullspace_step_snapshot "
                    "off, or use FSDP2."
                )
        micro_batches = self.args.gradient_accumulation_steps
        if self._gradient_hooks and micro_batches > 1:
            logger.warning(
                "trl-nullspace: the gradient projection (nullspace_projection_target=%r) runs on every rank's whole "
                "gradient at each of the %d micro-batches of a step, before ZeRO divides anything: that many times "
                "one device's gradient projection per step, per rank (counted for 7B in docs/results/memory.md). "
                "Under ZeRO-1/2 in bf16 or fp32, and ZeRO-3, it runs once per step in DeepSpeed's step instead "
                "(nullspace_deepspeed_projection='in_step'); the 'update' target projects once per step, each rank "
                "its own rows; FSDP2 projects the gradient once per step.",
                self.args.nullspace_projection_target,
                micro_batches,
            )

    def _build_master(self, in_step: bool) -> MasterProjector:
        constrained = self.projector.constrained
        device = self.accelerator.device
        zero_optimizer = self._zero_optimizer()
        if in_step and zero_optimizer is not None and supports_in_step_projection(zero_optimizer):
            return InStepZeroProjector(
                constrained,
                device,
                zero_optimizer,
                self.row_exchange,
                update=self.projects_updates,
                gradient=self.projects_gradients,
            )
        if self.row_exchange:  # refuses ZeRO-1/2 weights: every row would travel
            return RowExchangeZeroProjector(
                constrained,
                device,
                shard_bases=self.args.nullspace_shard_bases,
                gather_block_bytes=int(self.args.nullspace_offload_block_mib * 2**20),
                exchange_block_bytes=int(self.args.nullspace_offload_block_mib * 2**20),
            )
        return ZeroMasterProjector(constrained, device)

    def _remove_gradient_hooks(self) -> None:
        for handle in self._gradient_hooks:
            handle.remove()
        self._gradient_hooks = []

    def _zero_optimizer(self, stages: tuple[int, ...] = (1, 2)) -> Any | None:
        """DeepSpeed's ZeRO optimizer, where this run has one of those stages."""
        if self.accelerator.state.deepspeed_plugin.zero_stage not in stages:
            return None
        return self.accelerator.deepspeed_engine_wrapped.engine.optimizer

    def take_previous(self) -> None:
        """With complement bases: each rank records its own rows of the weights, once partitioned. Step snapshots
        are taken at the start of DeepSpeed's step instead (`Zero3GradientProjector`): the trainer's moment before
        the step comes after DeepSpeed has stepped."""
        if self.args.nullspace_step_snapshot:
            return
        if isinstance(self._master, RowExchangeZeroProjector | InStepZeroProjector):
            self._master.take_previous()

    def before_step(self, model: nn.Module, step: int, measure: bool) -> ProjectionStats | None:
        """Nothing: the engine has already stepped here, its gradient projected in its step or by the
        hooks in backward; the weights are checked after the step instead."""
        return None

    def after_step(self) -> torch.Tensor | None:
        """Check that the projections inside DeepSpeed's step ran, and project the masters where they
        run after it."""
        if self._zero3_gradients is not None:
            self._zero3_gradients.check_ran()
        if not self.projects_updates:
            if isinstance(self._master, InStepZeroProjector):
                self._master.enforce_anchors()  # checks the gradient was projected in the step
            return None
        return self._master.enforce_anchors()

    def summary(self) -> str:
        """Where DeepSpeed's projections run and what they exchange, once built."""
        built = (part for part in (self._master, self._zero3_gradients) if part is not None)
        return "".join(f" {part.summary()}." for part in built) + self.chosen_storage_summary()
