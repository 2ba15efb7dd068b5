"""`CapabilityConstraint`: the constraint one trainer trains under, as one object.

It composes four parts, each with one job: the `SubspaceSource` (where the subspace comes from:
cache, estimate, checkpoint), the `SubspaceProjector` bound to the model's trainable parameters
(`trl_nullspace.projection`), the `ConstraintBackend` that runs the projections where the weights
live (`trl_nullspace.backends`), and `StepMetrics` (what each step measured, until it is logged).
The trainer's mixin holds one and calls it at the Trainer's moments; nothing here subclasses or
reads the Trainer, so the constraint's state lives here, not in attributes spread over a trainer.

The invariant it keeps: every constrained weight `M` satisfies `M U = A` (its reference outputs)
after every optimizer step, or the set-up refused; parameters it cannot constrain are frozen
(`nullspace_freeze_untargeted`) or named in a warning.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn
from transformers.utils import logging

from trl_nullspace.backends.base import ConstraintBackend
from trl_nullspace.backends.node_memory import share_on_node
from trl_nullspace.backends.zero.gather import gathered_alone
from trl_nullspace.config import NullSpaceArguments
from trl_nullspace.estimation.subspace import CapabilitySubspace
from trl_nullspace.projection.projector import SubspaceProjector
from trl_nullspace.storage.cache import save_linked
from trl_nullspace.training import guards
from trl_nullspace.training.approximations import warn_approximations
from trl_nullspace.training.source import CHECKPOINT_FILE, SubspaceSource
from trl_nullspace.training.step_metrics import StepMetrics

logger = logging.get_logger(__name__)

# In the output folder: one file per distinct (subspace, anchors) that checkpoints link to.
CHECKPOINT_STORE = "nullspace_subspaces"
RATE_SCALE_FILE = "nullspace_learning_rate.json"  # `nullspace_scale_learning_rate`'s calibration, per checkpoint


class CapabilityConstraint:
    """The subspace in use (`subspace`), bound (`projector`), run by `backend`, measured by `metrics`.

    Built once the TRL trainer has its model (PEFT applied): loads or estimates the subspace,
    binds it, and freezes or reports what it cannot constrain. Cost at set-up: one estimate (a
    forward pass over the reference data) unless a cache matches; per step, what the backend's
    projections cost (docs/backends.md).
    """

    def __init__(self, model: nn.Module, args: NullSpaceArguments, source: SubspaceSource, backend: ConstraintBackend):
        self.args = args
        self.source = source
        self.backend = backend
        self.metrics = StepMetrics(args.nullspace_scale_learning_rate, args.nullspace_log_per_layer)
        self.frozen: list[str] = []  # frozen at set-up; a resumed run binds again after they already are
        self.subspace = source.load_or_estimate()
        self.projector = self.bind(model, self.subspace)
        self._freeze_or_report(model, self.projector.unconstrained)
        warn_approximations(args, self.subspace, [item.parameter for item in self.projector.constrained])

    # -- binding ------------------------------------------------------------------------------------

    def bind(self, model: nn.Module, subspace: CapabilitySubspace) -> SubspaceProjector:
        """`subspace` bound to `model`'s trainable parameters, anchored, and handed to the backend."""
        if self.args.nullspace_offload:  # an estimate made on the accelerator would otherwise stay there
            subspace.bases = {key: basis.cpu() for key, basis in subspace.bases.items()}
        projector = SubspaceProjector.bind(
            model,
            subspace,
            compute_dtype=getattr(torch, self.args.nullspace_projection_dtype),
            offload_block_bytes=self.args.nullspace_offload_block_bytes,
            smaller_storage=self.args.nullspace_basis_storage == "smaller",
            share_host=share_on_node if self.args.nullspace_offload_share_node else None,
            complement_dtype=getattr(torch, self.args.nullspace_complement_dtype),
        )
        projector = self.backend.supported(projector)  # the rest frozen, with a warning
        projector.check_trainable_directions()
        if self.args.nullspace_step_snapshot:
            projector.use_step_snapshots()  # before the anchors: none is recorded then
        # ZeRO-3 may have partitioned the weights already (zero.Init): each is gathered in turn.
        peak = self.source.gather_peak
        projector.initialise_anchors(
            track_updates=self.args.nullspace_projection_target in ("update", "both"),
            around=lambda parameter: gathered_alone(parameter, peak, modifier_rank=0),
        )
        self.backend.bind(projector)
        return projector

    def _freeze_or_report(self, model: nn.Module, unconstrained: list[str]) -> None:
        if not unconstrained:
            return
        if not self.args.nullspace_freeze_untargeted:
            logger.warning(
                "trl-nullspace: %d trainable parameters are NOT constrained (nullspace_freeze_untargeted=False) "
                "and may change reference outputs: %s",
                len(unconstrained),
                unconstrained[:8],
            )
            return
        parameters = dict(model.named_parameters())
        self.frozen = sorted(unconstrained)
        for name in unconstrained:
            parameters[name].requires_grad_(False)
        logger.info("trl-nullspace: froze %d parameters outside the constraint", len(unconstrained))
        # Big matrices frozen are capacity the safety update cannot use: say so, not only count them.
        # Fused experts are constrained by the activation method on one process or DDP only; other
        # layouts, and routers beside them, are frozen.
        large = [name for name in self.frozen if parameters[name].dim() >= 3 or ".mlp.gate." in name]
        if large:
            logger.warning(
                "trl-nullspace: %d mixture-of-experts parameters are frozen, not constrained (e.g. %s): experts "
                "are constrained only in the layouts of Mixtral, Qwen2/3-MoE and GPT-OSS, with the activation "
                "method, on one process or DDP (docs/architectures.md). The safety update trains the rest.",
                len(large),
                large[:3],
            )

    # -- the Trainer's moments ----------------------------------------------------------------------

    def begin_training(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """As training begins (the model sharded, a resumed checkpoint loaded): check the optimizer, let
        the backend build what needs the sharded model, and record the weights the first projection
        keeps the change from."""
        self._check_optimizer(model, optimizer)
        self.backend.begin_training(model)
        self._take_previous()

    def _check_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """The optimizer must step what is projected (`guards.check_optimizer_steps_what_is_constrained`),
        where it steps the module's parameters at all (not under DeepSpeed or FSDP2: their shards'
        projectors map every constrained weight to the optimizer's copies themselves, or fail)."""
        if optimizer is None or not self.backend.optimizer_steps_module_parameters:
            return
        allowed = set(self.projector.free)
        if not self.args.nullspace_freeze_untargeted:
            allowed |= set(self.projector.unconstrained)
        guards.check_optimizer_steps_what_is_constrained(
            optimizer,
            {item.name: item.parameter for item in self.projector.constrained},
            allowed,
            dict(model.named_parameters()),
        )

    def _take_previous(self) -> None:
        """With complement bases, the weights the first `update` projection keeps the change from (with step
        snapshots, each step takes its own in `before_step`)."""
        if (
            self.args.nullspace_projection_target == "gradient"
            or self.args.nullspace_basis_storage == "basis"
            or self.args.nullspace_step_snapshot
        ):
            return
        self.backend.take_previous()

    def before_step(
        self,
        model: nn.Module,
        step: int,
        will_be_logged: bool,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    ) -> None:
        """The gradients of optimizer step `step + 1` are complete: the backend's gradient moment, measured
        when the step will be logged or the learning-rate scale calibrates."""
        measure = self.metrics.wants_measurement(will_be_logged)
        stats = self.backend.before_step(model, step, measure)
        if stats is not None:
            self.metrics.observe_gradient(stats, optimizer, scheduler)
        if self.args.nullspace_step_snapshot:
            self.backend.take_previous()  # the weights this step's change is measured from, freed after it

    def after_step(self) -> None:
        """`optimizer.step()` has run: the backend restores the constraint on the weights."""
        removed = self.backend.after_step()
        if removed is not None:
            self.metrics.observe_update(removed)

    def refresh(self, model: nn.Module) -> None:
        """Re-estimate from the current weights and re-anchor (`nullspace_refresh_steps`)."""
        self.subspace = self.source.refresh()
        self.projector = self.bind(model, self.subspace)
        self._take_previous()

    # -- checkpoints --------------------------------------------------------------------------------

    def save_checkpoint(self, folder: str, output_dir: str, is_main_process: bool) -> None:
        """The subspace in use and its whole anchors into checkpoint `folder`, stored once per run in
        `CHECKPOINT_STORE` and hard-linked (`cache.save_linked`), so resuming binds the same constraint.
        Every process calls it: gathering sharded anchors is a collective."""
        anchors = self.backend.anchors_at_save()
        if not is_main_process:
            return
        save_linked(
            os.path.join(folder, CHECKPOINT_FILE),
            os.path.join(output_dir, CHECKPOINT_STORE),
            self.subspace,
            self.source.saved_provenance(),
            anchors=anchors,
        )
        scaler = self.metrics.rate_scaler
        if scaler is not None:
            with open(os.path.join(folder, RATE_SCALE_FILE), "w") as handle:
                json.dump(scaler.state_dict(), handle)

    def restore_checkpoint(self, model: nn.Module, checkpoint: str) -> None:
        """Bind the subspace and anchors `checkpoint` trained under (before TRL's loop resumes)."""
        self.subspace, header = self.source.restore(checkpoint)
        self.projector = self.bind(model, self.subspace)
        # Step snapshots keep no anchors: the constraint is kept from the loaded weights on, step by step.
        if not self.args.nullspace_step_snapshot:
            self.projector.restore_anchors(header["anchors"])
        self._restore_rate_scale(checkpoint)

    def _restore_rate_scale(self, checkpoint: str) -> None:
        rate_scale = os.path.join(checkpoint, RATE_SCALE_FILE)
        if self.metrics.rate_scaler is not None and os.path.exists(rate_scale):
            with open(rate_scale) as handle:
                self.metrics.rate_scaler.load_state_dict(json.load(handle))
