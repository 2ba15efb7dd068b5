"""DeepSpeed ZeRO-3: the gradient projection runs once per optimizer step, each rank on its partition.

ZeRO-3 gathers each weight whole for backward, so a hook in backward sees the whole gradient: every
rank projected every weight's whole gradient at every micro-batch (world × micro-batches times one
device's projection, and the hook's d_out × d copies on the accelerator). Here the projection waits
until DeepSpeed has reduced the last micro-batch's gradients into each rank's partition: at the start
of DeepSpeed's step, before it takes their norm, each rank projects its own partition of every
constrained weight's gradient. Only the rows that partition boundaries cut are exchanged, as for the
masters (`zero`). DeepSpeed then takes the norm of the projected gradient, clips it and steps, as the
Trainer clips on one device; with any loss scale too (the projection is linear).

The partitions are read and written through the optimizer's local-gradient API (the one behind
`deepspeed.utils.safe_get_local_grad`/`safe_set_local_grad`), which also refreshes DeepSpeed's
offloaded gradient norms. DeepSpeed accumulates gradients in the model's dtype unless told otherwise,
so each read may be an fp32 copy: one weight's partition at a time, read once for the exchanged
coefficients and once to project it, never the rank's whole gradient at once.

With step snapshots (`nullspace_step_snapshot`) the same moment records each rank's master fragments,
the point the update projection after the step keeps the change from (`RowExchangeZeroProjector`):
the trainer's own moment before the step comes after DeepSpeed has stepped.

ZeRO-3's optimizer is not a `torch.optim.Optimizer` and has no step hooks, and its inner optimizer is
stepped once per sub-group after the clipping. So this wraps the `step` of the one optimizer instance
the engine steps; after each step the trainer checks that the projection ran, so a DeepSpeed that
steps another way fails loudly instead of training without the constraint.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from trl_nullspace.backends.zero.fragments import MasterFragment
from trl_nullspace.backends.zero.master import RowExchangeZeroProjector, ZeroMasterProjector


def supports_step_start_projection(zero3_optimizer: Any) -> bool:
    """Whether this ZeRO-3 optimizer has the local-gradient API the projection reads and writes."""
    return all(
        callable(getattr(zero3_optimizer, name, None))
        for name in ("step", "get_local_fp32_grad_for_param", "set_local_grad_for_param")
    )


class Zero3GradientProjector:
    """Projects each rank's ZeRO-3 gradient partitions at the start of DeepSpeed's step, and takes the step
    snapshots there (module docstring)."""

    def __init__(
        self,
        projector: ZeroMasterProjector | RowExchangeZeroProjector,
        zero3_optimizer: Any,
        loss_scaled: bool,
        gradients: bool = True,
        snapshots: bool = False,
    ):
        """`projector`: the run's projector of ZeRO-3 masters, whose fragments lie where the gradient
        partitions do. `loss_scaled` (fp16): a NaN or inf gradient is an overflow that DeepSpeed skips
        the step for, so it is left unprojected; otherwise the projector raises, naming the weights.
        `gradients`: project the gradient; `snapshots`: record the masters (a `RowExchangeZeroProjector`'s)."""
        self.projector = projector
        self.zero3_optimizer = zero3_optimizer
        self.loss_scaled = loss_scaled
        self.gradients = gradients
        self.snapshots = snapshots
        self._ran = False
        self._unwrapped_step = zero3_optimizer.step
        zero3_optimizer.step = self._projected_step  # this instance only; `remove` restores it

    def _projected_step(self, *args: Any, **kwargs: Any) -> Any:
        self.project()
        return self._unwrapped_step(*args, **kwargs)

    @torch.no_grad()
    def project(self) -> None:
        """Record the masters (step snapshots), then `G ← G − (G U) Uᵀ` (a complement: `G ← G N Nᵀ`) on this
        rank's gradient partitions."""
        if self.snapshots:
            self.projector.take_previous()  # a skipped step then projects a zero change
        if not self.gradients:
            self._ran = True
            return
        if self.loss_scaled and self._any_rank_overflowed():
            self._ran = True  # DeepSpeed finds the overflow and skips this step
            return
        # Without a loss scale a NaN or inf gradient is no overflow: the projector raises on every rank.
        self.projector.project_gradients(self)
        self._ran = True

    def read(self, fragment: MasterFragment) -> torch.Tensor:
        """This rank's fp32 gradient partition of `fragment`'s weight (`zero.GradientAccess`): a copy
        where DeepSpeed keeps it in low precision or offloaded, so one weight's at a time."""
        gradient = self.zero3_optimizer.get_local_fp32_grad_for_param(fragment.item.parameter)
        return gradient.to(fragment.item.device).view(-1)

    def write(self, fragment: MasterFragment, gradient: torch.Tensor) -> None:
        """Store the projected partition back (DeepSpeed also refreshes its offloaded gradient norm)."""
        self.zero3_optimizer.set_local_grad_for_param(gradient, fragment.item.parameter)

    def _any_rank_overflowed(self) -> bool:
        """Whether any rank's gradients hold NaN or inf: a loss-scale overflow that DeepSpeed will
        skip the step for (a collective, so all ranks decide alike)."""
        overflowed = any(not self.read(fragment).isfinite().all() for fragment in self.projector.fragments)
        flag = torch.tensor(float(overflowed), device=self.projector.communication_device)
        dist.all_reduce(flag)
        return bool(flag.item())

    def check_ran(self) -> None:
        """Called after each optimizer step: raises if DeepSpeed stepped without the projection."""
        ran, self._ran = self._ran, False
        if not ran:
            raise RuntimeError(
                "DeepSpeed ZeRO-3 stepped without the trl-nullspace gradient projection (or step snapshot) running at "
                "the start of its step: this DeepSpeed version steps its optimizer another way, and the constraint "
                "would not hold. "
                "Please report it with your DeepSpeed version; nullspace_projection_target='update' or FSDP2 work "
                "meanwhile."
            )

    def summary(self) -> str:
        """Where the gradient is projected and the snapshots are taken, for the log."""
        parts = ["ZeRO-3 gradient projection once per step"] if self.gradients else []
        parts += ["step snapshots of each rank's masters"] if self.snapshots else []
        return " and ".join(parts) + " at the start of DeepSpeed's step, each rank its partition"

    def remove(self) -> None:
        """Stop projecting (the trainer bound a new subspace): DeepSpeed's own step again."""
        if self.zero3_optimizer.__dict__.get("step") == self._projected_step:
            del self.zero3_optimizer.step
