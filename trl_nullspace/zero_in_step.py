"""DeepSpeed ZeRO-1/2: the `update` projection runs inside DeepSpeed's optimizer step.

ZeRO-1/2 keep a full low-precision copy of every weight on every rank, and DeepSpeed refreshes it at
the end of its step: each rank copies its fp32 master partition into its low-precision partition,
then all ranks all-gather those. Projected after the step (`zero.ZeroMasterProjector` alone), every
rank must correct its whole module copy, so every rank does the whole projection's work again and
all `d_out × k` coefficients of every weight travel. Projected right after the inner optimizer has
stepped a group's fp32 partition, before that copy, DeepSpeed's own all-gather carries the projected
values to every rank: each rank projects its own rows only (1/world of the work and of the
anchors), and only the rows that partition boundaries cut travel, as under ZeRO-3.

The hook is a public PyTorch one (`Optimizer.register_step_post_hook`) on the optimizer DeepSpeed
steps; DeepSpeed steps it once per parameter group. After each optimizer step the trainer checks
that every group holding constrained weights was projected (or that DeepSpeed skipped the step on
overflow), so a DeepSpeed version that steps another way fails loudly instead of training without
the constraint.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from trl_nullspace.projector import ConstrainedParameter
from trl_nullspace.zero import (
    MasterFragment,
    RowExchangeZeroProjector,
    ZeroMasterProjector,
    fragments_anchors,
    stage12_fragment,
)


def stage12_partition_boundaries(
    constrained: list[ConstrainedParameter], device: torch.device
) -> dict[str, list[int]]:
    """Per weight, the flat offsets where one rank's ZeRO-1/2 master fragment ends and the next
    one's begins (a collective: every rank learns every rank's fragments, so all lay out the
    exchanged rows alike)."""
    extents = torch.tensor([stage12_fragment(item.parameter) for item in constrained], dtype=torch.long, device=device)
    everyone = [torch.empty_like(extents) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, extents)
    boundaries = {}
    for index, item in enumerate(constrained):
        size = item.parameter.numel()
        cuts = set()
        for rank_extents in everyone:
            start, numel = (int(value) for value in rank_extents[index])
            if numel:
                cuts.update({start, start + numel})
        boundaries[item.name] = sorted(cut for cut in cuts if 0 < cut < size)
    return boundaries


def supports_in_step_projection(zero_optimizer: Any) -> bool:
    """Whether this ZeRO-1/2 optimizer steps its groups through the inner optimizer's `step`
    on every rank alike. A torch autocast GradScaler can skip the step on one rank and not another
    (each checks its own gradients), and ZenFlow steps on its own: both keep the after-step path."""
    return (
        hasattr(zero_optimizer, "single_partition_of_fp32_groups")
        and hasattr(zero_optimizer, "bit16_groups")
        and isinstance(getattr(zero_optimizer, "optimizer", None), torch.optim.Optimizer)
        and not getattr(zero_optimizer, "torch_autocast_gradscaler", None)
        and not getattr(zero_optimizer, "zenflow", False)
    )


class InStepZeroProjector:
    """Enforces `M U = A` on ZeRO-1/2 master partitions inside DeepSpeed's step (module docstring)."""

    def __init__(
        self,
        constrained: list[ConstrainedParameter],
        communication_device: torch.device,
        zero_optimizer: Any,
        row_exchange: bool = False,
    ):
        """`row_exchange`: offloaded or complement bases (`RowExchangeZeroProjector`), else
        `ZeroMasterProjector`; either projects only this rank's rows, given the partitions' boundaries."""
        self.communication_device = communication_device
        self.zero_optimizer = zero_optimizer
        groups = zero_optimizer.bit16_groups
        group_of = {id(parameter): index for index, group in enumerate(groups) for parameter in group}
        outside = [item.name for item in constrained if id(item.parameter) not in group_of]
        if outside:
            raise RuntimeError(
                f"{outside[:3]} are constrained but not in any DeepSpeed parameter group: the DeepSpeed optimizer "
                "does not step them, so the projection cannot reach their updates."
            )
        boundaries = stage12_partition_boundaries(constrained, communication_device)
        by_group: dict[int, list[ConstrainedParameter]] = {}
        for item in constrained:
            by_group.setdefault(group_of[id(item.parameter)], []).append(item)
        # The inner optimizer sees each group's fp32 partition as that group's only parameter.
        partitions = zero_optimizer.single_partition_of_fp32_groups
        projector = RowExchangeZeroProjector if row_exchange else ZeroMasterProjector
        self.groups: dict[int, ZeroMasterProjector | RowExchangeZeroProjector] = {
            id(partitions[index]): projector(items, communication_device, boundaries)
            for index, items in sorted(by_group.items())
        }
        self._projected: set[int] = set()
        self._squares: list[torch.Tensor] = []
        self._hook = zero_optimizer.optimizer.register_step_post_hook(self._after_inner_step)

    def _after_inner_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group in optimizer.param_groups:
            key = id(group["params"][0])
            projector = self.groups.get(key)
            if projector is not None:
                self._squares.append(projector.enforce_anchors().square())
                self._projected.add(key)

    @torch.no_grad()
    def enforce_anchors(self) -> torch.Tensor:
        """Called after DeepSpeed's step: the projection already ran inside it. Checks that it ran
        for every group (unless DeepSpeed skipped the step on overflow) and returns ‖M U − A‖ over
        this rank's rows."""
        projected, squares = self._projected, self._squares
        self._projected, self._squares = set(), []
        if projected != set(self.groups) and not getattr(self.zero_optimizer, "overflow", False):
            raise RuntimeError(
                "DeepSpeed stepped without the trl-nullspace projection running inside its step (projected "
                f"{len(projected)} of {len(self.groups)} parameter groups): this DeepSpeed version steps its "
                "optimizer another way, and the constraint would not hold. Please report it with your DeepSpeed "
                "version; ZeRO-3 or FSDP2 work meanwhile."
            )
        if not squares:
            return torch.zeros((), dtype=torch.float32, device=self.communication_device)
        return torch.stack(squares).sum().sqrt()

    def full_anchors(self) -> dict[str, torch.Tensor]:
        """The whole anchors from every rank's rows, for a checkpoint (a collective)."""
        return fragments_anchors(self._fragments(), self.communication_device)

    def _fragments(self) -> list[MasterFragment]:
        return [fragment for projector in self.groups.values() for fragment in projector.fragments]

    def take_previous(self) -> None:
        """With complement bases: record every fragment's master values before training."""
        for projector in self.groups.values():
            if isinstance(projector, RowExchangeZeroProjector):
                projector.take_previous()

    def summary(self) -> str:
        """Where the projection runs and what travels per step (per DeepSpeed parameter group), for the log."""
        return "ZeRO-1/2 projection inside DeepSpeed's step: " + " | ".join(
            projector.summary() for projector in self.groups.values()
        )

    def remove(self) -> None:
        """Stop projecting inside DeepSpeed's step (the trainer bound a new subspace)."""
        self._hook.remove()
