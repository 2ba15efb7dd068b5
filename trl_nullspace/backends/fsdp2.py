"""FSDP2: the projections on row-sharded weights and gradients, with no communication at all.

FSDP2 (`fully_shard`) replaces every parameter by a DTensor sharded along dim 0 and the optimizer
steps the local shards (kept in fp32 under mixed precision: they are the master weights). A Linear
weight's rows are its output features and the basis `U` acts on its input features, so each rank
restores `M U = A` on its own rows, `M_r ← M_r − (M_r U − A_r) Uᵀ`, using its rows of the anchor,
and removes `G_r U Uᵀ` from its rows of the reduced gradient before the step.

`FSDP2Backend` runs that projector at the trainer's moments; FSDP1's flat parameters are refused
(the projection would not reach the masters), and so is the gradient method (its flattened bases
have no rows).

With `nullspace_shard_bases` the bases are split over the ranks too (`SharedBasis.shard_rows`): the
projections then run one distinct basis at a time, each gathered whole just before the weights that
read it (q/k/v share one) and freed after, so a rank holds 1/world of every basis plus one whole,
and receives every basis once per projection (twice per step under the default `both` target). A basis
larger than `nullspace_offload_block_mib` is gathered one column block at a time instead, by each weight
that reads it (at real shapes only `down_proj`'s input is, which one weight reads), so no more than a
block is whole at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from trl_nullspace.backends.sharded import ShardedBackend
from trl_nullspace.backends.split_bases import grouped_by_basis, split_bases, with_bases_gathered
from trl_nullspace.config import NullSpaceArguments
from trl_nullspace.projection.anchors import gather_anchors
from trl_nullspace.projection.constrained import ConstrainedParameter, ProjectionStats, diverged_step_error, total_norm
from trl_nullspace.projection.projector import SubspaceProjector


class _RowShard:
    """One constrained weight as FSDP2 holds it: the local rows and where they start."""

    def __init__(self, item: ConstrainedParameter, parameter: nn.Parameter):
        if item.flat:
            raise NotImplementedError("The gradient method's flattened bases are not supported under FSDP yet.")
        self.item = item
        self.parameter = parameter
        item.move_to(parameter.device)
        rows = item.matrix_shape[0]
        if isinstance(parameter.data, DTensor):
            if tuple(parameter.placements) != (Shard(0),):
                raise NotImplementedError(
                    f"{item.name} is placed as {parameter.placements}; trl-nullspace supports FSDP2's row "
                    "sharding (Shard(0)) on a 1-D mesh only."
                )
            mesh = parameter.device_mesh
            chunk = -(-rows // mesh.size())  # torch.chunk's split: ceil(rows / shards) per rank
            self.start = mesh.get_local_rank() * chunk
        else:
            self.start = 0
        item.keep_anchor_rows(self.start, self.local_matrix().shape[0])  # each rank keeps its rows' anchors

    def local_matrix(self, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's rows of the weight (or of `tensor`, e.g. its gradient) as a d_rows×d_in view."""
        tensor = self.parameter.data if tensor is None else tensor
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        return local.view(-1, self.item.matrix_shape[1])

    def project_gradient(self) -> torch.Tensor | None:
        """`G_r ← G_r − (G_r U) Uᵀ` on the local rows of the reduced gradient; returns `G_r U` (or its norm)."""
        if self.parameter.grad is None:
            return None
        return self.item.enforce_on(self.local_matrix(self.parameter.grad), anchored=False)

    def enforce_anchor(self) -> torch.Tensor:
        matrix = self.local_matrix()
        return self.item.enforce_on(matrix, rows=slice(self.start, self.start + matrix.shape[0]))


class RowShardProjector:
    """Enforces `M U = A` on FSDP2's row shards; built after `fully_shard` swapped the parameters.

    With `shard_bases`, each distinct basis keeps only this rank's rows (of FSDP's mesh) and is
    gathered whole for the weights that read it, one basis at a time, or, where larger than
    `gather_block_bytes`, one column block at a time by each weight that reads it (module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        constrained: list[ConstrainedParameter],
        shard_bases: bool = False,
        gather_block_bytes: int | None = None,
    ):
        parameters = dict(model.named_parameters())
        missing = [item.name for item in constrained if item.name not in parameters]
        if missing:
            raise RuntimeError(f"FSDP renamed or dropped constrained parameters, e.g. {missing[:3]}.")
        if shard_bases and constrained:
            parameter = parameters[constrained[0].name]  # one of the sharded weights: FSDP's mesh and device
            group = parameter.device_mesh.get_group() if isinstance(parameter.data, DTensor) else None
            split_bases(constrained, parameter.device, group, gather_block_bytes)
        # In projection order: grouped by basis, the same on every rank, so the gathers line up.
        self.shards = [_RowShard(item, parameters[item.name]) for item in grouped_by_basis(constrained)]

    def _each_shard_with_its_basis(self) -> Iterator[_RowShard]:
        """Every shard, grouped by basis, each basis whole (gathered if row-sharded) while its shards are used."""
        return with_bases_gathered(self.shards)

    def take_previous(self) -> None:
        """With complement bases (before training) or step snapshots (before each step): record each rank's rows
        of the weights, the point the next `update` projection keeps the change from."""
        for shard in self.shards:
            shard.item.take_previous(shard.local_matrix(), shard.start)

    def full_anchors(self) -> dict[str, torch.Tensor]:
        """The whole anchors from every rank's rows, for a checkpoint (a collective)."""
        device = self.shards[0].local_matrix().device if self.shards else torch.device("cpu")
        return gather_anchors(
            {s.item.name: s.item.anchor_state for s in self.shards if s.item.anchor_state is not None}, device
        )

    def project_gradients(self) -> torch.Tensor:
        """Remove every local gradient shard's component in the subspace; returns this rank's removed norm."""
        removed = [
            coefficients
            for shard in self._each_shard_with_its_basis()
            if (coefficients := shard.project_gradient()) is not None
        ]
        return total_norm(removed) if removed else torch.zeros(())

    def enforce_anchors(self) -> torch.Tensor:
        """Project every local shard back onto its anchor rows; returns this rank's removed norm.

        The finiteness check is this backend's only guard against a diverged step (the gradients
        are never seen whole), so it reads one flag per step; the norm itself stays on the device.
        """
        residuals = [shard.enforce_anchor() for shard in self._each_shard_with_its_basis()]  # `self.shards`' order
        norm = total_norm(residuals)
        if not torch.isfinite(norm):
            bad = [s.item.name for s, r in zip(self.shards, residuals, strict=True) if not torch.isfinite(r).all()]
            raise diverged_step_error(bad)
        return norm


class FSDP2Backend(ShardedBackend):
    """FSDP2's row shards: the gradient projected locally before the step, the masters after it."""

    name = "FSDP"
    lean_storage_built = True
    shards_bases = True
    takes_step_snapshots = True
    low_precision_complements = True

    def __init__(self, args: NullSpaceArguments, accelerator: Any):
        super().__init__(args, accelerator)
        self._shards: RowShardProjector | None = None

    @property
    def shards(self) -> RowShardProjector | None:
        return self._shards

    def check_supported(self, model: nn.Module, trainer_name: str) -> None:
        super().check_supported(model, trainer_name)
        if not self.accelerator.is_fsdp2:
            raise NotImplementedError(
                f"{trainer_name} does not support FSDP1: its flat parameters hold the weights and master "
                "copies, so the projection would silently not apply. Use fsdp_version: 2, DeepSpeed ZeRO or DDP."
            )
        if self.args.nullspace_method != "activation":
            raise NotImplementedError("Under FSDP only nullspace_method='activation' is supported yet.")

    def bind(self, projector: SubspaceProjector) -> None:
        super().bind(projector)
        self._shards = None  # built again as training begins, on the sharded parameters

    def begin_training(self, model: nn.Module) -> None:
        self._shards = RowShardProjector(
            model,
            self.projector.constrained,
            self.args.nullspace_shard_bases,
            gather_block_bytes=int(self.args.nullspace_offload_block_mib * 2**20),
        )

    def take_previous(self) -> None:
        self._shards.take_previous()

    def before_step(self, model: nn.Module, step: int, measure: bool) -> ProjectionStats | None:
        """The local rows of the reduced gradient; not measured (no rank sees the whole gradient)."""
        if self.projects_gradients:
            self._shards.project_gradients()
        return None

    def after_step(self) -> torch.Tensor | None:
        return self._shards.enforce_anchors() if self.projects_updates else None

    def summary(self) -> str:
        split = " Bases split over the ranks by rows, each gathered whole while the weights that read it are projected"
        return (f"{split}." if self.args.nullspace_shard_bases else "") + self.chosen_storage_summary()
