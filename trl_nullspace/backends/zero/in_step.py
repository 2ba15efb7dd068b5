"""DeepSpeed ZeRO-1/2: the projections run inside DeepSpeed's optimizer step.

ZeRO-1/2 keep a full low-precision copy of every weight on every rank, and DeepSpeed refreshes it at
the end of its step: each rank copies its fp32 master partition into its low-precision partition,
then all ranks all-gather those. Projected after the step (`zero.ZeroMasterProjector` alone), every
rank must correct its whole module copy, so every rank does the whole projection's work again and
all `d_out × k` coefficients of every weight travel. Projected right after the inner optimizer has
stepped a group's fp32 partition, before that copy, DeepSpeed's own all-gather carries the projected
values to every rank: each rank projects its own rows only (1/world of the work and of the
anchors), and only the rows that partition boundaries cut travel, as under ZeRO-3.

The gradient projection likewise runs once per optimizer step, on each rank's fragment of the
reduced fp32 gradient, right before the inner optimizer steps it, instead of on every rank's whole
gradient at every micro-batch (a hook in backward, as under ZeRO-3). DeepSpeed has clipped that
gradient by its norm before the projection; the other backends clip the projected gradient, so the
clipping is redone from the energy the projection removed (`_clip_correction`).

The hooks are public PyTorch ones (`Optimizer.register_step_pre_hook`/`register_step_post_hook`) on
the optimizer DeepSpeed steps; DeepSpeed steps it once per parameter group. After each optimizer
step the trainer checks that the projections ran (or that DeepSpeed skipped the step on overflow),
so a DeepSpeed version that steps another way fails loudly instead of training without the
constraint.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from trl_nullspace.backends.split_bases import distinct_bases
from trl_nullspace.backends.zero.fragments import MasterFragment, stage12_fragment
from trl_nullspace.backends.zero.master import RowExchangeZeroProjector, ZeroMasterProjector, fragments_anchors
from trl_nullspace.projection.constrained import ConstrainedParameter


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
    (each checks its own gradients), ZenFlow steps on its own, and DeepSpeed's BF16_Optimizer (ZeRO-1
    with fp32 gradient accumulation) keeps other partitions: all keep the after-step path."""
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
        update: bool = True,
        gradient: bool = False,
    ):
        """`row_exchange`: offloaded or complement bases (`RowExchangeZeroProjector`), else
        `ZeroMasterProjector`; either projects only this rank's rows, given the partitions' boundaries.
        `update`: project the masters after the inner step; `gradient`: project the gradient before
        it, where `projects_gradients` says that is possible (else the trainer's hooks in backward do)."""
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
        inner = zero_optimizer.optimizer
        self.update = update
        self._hooks = [inner.register_step_post_hook(self._after_inner_step)] if update else []
        first_group = id(partitions[0])
        self.projects_gradients = gradient and set(self.groups) == {first_group} and _clips_as_expected(zero_optimizer)
        self._gradient_scale: torch.Tensor | None = None
        self._gradient_projected = False
        if self.projects_gradients:
            self._hooks.append(inner.register_step_pre_hook(self._before_inner_step))
        # Every projection of this run now reads only this rank's fragments, unless the gradient is still
        # projected whole by the hooks in backward: the bases no fragment reads can go.
        self.bases_kept = release_unread_bases(self._fragments()) if self.projects_gradients or not gradient else None

    def _before_inner_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Project the constrained group's gradient (the first group DeepSpeed steps) and redo the
        clipping DeepSpeed did by the unprojected gradient's norm, for every group of this step."""
        for group in optimizer.param_groups:
            partition = group["params"][0]
            projector = self.groups.get(id(partition))
            if projector is not None:
                removed = projector.project_gradients(_FlatPartitionGradient(partition.grad))
                self._gradient_scale = _clip_correction(self.zero_optimizer, removed)
                self._gradient_projected = True
            if self._gradient_scale is not None:
                partition.grad.mul_(self._gradient_scale.to(partition.grad.device))

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
        projected, squares, gradient_projected = self._projected, self._squares, self._gradient_projected
        self._projected, self._squares, self._gradient_projected = set(), [], False
        self._gradient_scale = None
        skipped = getattr(self.zero_optimizer, "overflow", False)
        missed_update = self.update and projected != set(self.groups)
        if (missed_update or (self.projects_gradients and not gradient_projected)) and not skipped:
            raise RuntimeError(
                "DeepSpeed stepped without the trl-nullspace projection running inside its step (projected "
                f"{len(projected)} of {len(self.groups)} parameter groups, gradient projected: {gradient_projected}): "
                "this DeepSpeed version steps its optimizer another way, and the constraint would not hold. Please "
                "report it with your DeepSpeed version; ZeRO-3 or FSDP2 work meanwhile."
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
        where = "the gradient once per step before the optimizer, " if self.projects_gradients else ""
        where += "the masters after it" if self.update else ""
        kept = "" if self.bases_kept is None else f"; {self.bases_kept}"
        return (
            f"ZeRO-1/2 projection inside DeepSpeed's step ({where.removesuffix(', ')}): "
            + " | ".join(projector.summary() for projector in self.groups.values())
            + kept
        )

    def remove(self) -> None:
        """Stop projecting inside DeepSpeed's step (the trainer bound a new subspace)."""
        for hook in self._hooks:
            hook.remove()


def release_unread_bases(fragments: list[MasterFragment]) -> str:
    """Free the bases that none of this rank's fragments reads (`SharedBasis.release`) and say, for the
    log, how many distinct bases and bytes this rank keeps.

    A ZeRO-1/2 rank's partition of a parameter group is one contiguous range of its flattened weights,
    so it reaches about 1/world of the layers plus the ones its two ends cut: the bases held fall as
    1/world (B/world plus at most two per group), with no new communication."""
    distinct = distinct_bases(fragment.item for fragment in fragments)
    read = {id(shared) for shared in distinct_bases(fragment.item for fragment in fragments if fragment.holds_rows)}
    total_bytes = sum(shared.resident_bytes for shared in distinct)
    for shared in distinct:
        if id(shared) not in read:
            shared.release()
    kept = [shared for shared in distinct if not shared.released]
    kept_bytes = sum(shared.resident_bytes for shared in kept)
    return (
        f"this rank keeps {len(kept)} of {len(distinct)} bases ({kept_bytes / 2**20:.2f} of "
        f"{total_bytes / 2**20:.2f} MiB; offloaded ones stay in host memory)"
    )


class _FlatPartitionGradient:
    """ZeRO-1/2's fp32 gradient fragments (`zero.GradientAccess`): views of a group's flat gradient
    partition, projected in place."""

    def __init__(self, flat_gradient: torch.Tensor):
        self.flat_gradient = flat_gradient

    def read(self, fragment: MasterFragment) -> torch.Tensor:
        return fragment.stage12_gradient(self.flat_gradient)

    def write(self, fragment: MasterFragment, gradient: torch.Tensor) -> None:
        """Nothing to do: `read` gave a view."""


def _clips_as_expected(zero_optimizer: Any) -> bool:
    """Whether `_clip_correction` can redo this optimizer's clipping: no loss scaling (bf16 or fp32;
    fp16's dynamic scale changes between the norm and the clip) and the global norm at hand."""
    if float(getattr(zero_optimizer, "loss_scale", 0.0)) != 1.0 or not hasattr(zero_optimizer, "clip_grad"):
        return False
    return bool(getattr(zero_optimizer, "compute_grad_norm", False)) or float(zero_optimizer.clip_grad) <= 0


def _clip_correction(zero_optimizer: Any, removed_squared: torch.Tensor) -> torch.Tensor | None:
    """The factor that turns DeepSpeed's clipping by the unprojected gradient's norm into clipping by
    the projected one's (as the Trainer clips the projected gradient on the other backends).

    DeepSpeed divided every gradient by `max(1, (‖g‖ + 1e-6) / clip)`; the projection removed
    `removed_squared` of the clipped gradient's squared norm, so the projected gradient's norm is
    `√(‖g‖² − old² · removed)`. None when DeepSpeed does not clip."""
    clip = float(zero_optimizer.clip_grad)
    if clip <= 0:
        return None
    norm = torch.as_tensor(zero_optimizer._global_grad_norm, dtype=torch.float32, device=removed_squared.device)
    old = torch.clamp((norm + 1e-6) / clip, min=1.0)
    projected = torch.sqrt(torch.clamp(norm.square() - old.square() * removed_squared, min=0.0))
    return old / torch.clamp((projected + 1e-6) / clip, min=1.0)
