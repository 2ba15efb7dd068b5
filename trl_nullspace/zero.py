"""DeepSpeed ZeRO-1/2/3: the `update` projection applied to the optimizer's partitioned master weights.

Under ZeRO the optimizer steps fp32 master weights of which each rank holds one contiguous fragment
(a slice of the parameter flattened row-major). The module's tensors are only a low-precision copy:
full on every rank under ZeRO-1/2 and for ZeRO-3's small "persistent" parameters, partitioned like
the master otherwise. Projecting the module's tensors would be overwritten by the next step.

Per optimizer step, for every constrained parameter seen as a matrix `M` (rows of length `n`,
orthonormal basis `U` n×k, anchor `A = M₀ U`):
 1. each rank adds its fragment's share of `M U` into a d_out×k coefficient block (rows its
    fragment covers only in part get partial sums, completed by the other ranks' shares);
 2. one all-reduce (sum) of all parameters' blocks packed into one fp32 buffer: Σ d_out·k values,
    a k/n fraction of the parameter count, never the weights or gradients themselves;
 3. every rank subtracts its rows of `(M U − A) Uᵀ` from its own master fragment, copies the
    fragment into its low-precision partition and, where the full low-precision parameter is
    materialised, subtracts the same from it, so replicas match the masters before the next forward.
The extra memory is the bases and anchors (held whole on every rank) and one coefficient buffer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trl_nullspace.projector import ConstrainedParameter, diverged_step_error


def is_partitioned(parameter: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 holds this parameter (possibly partitioned away from the module)."""
    return hasattr(parameter, "ds_id")


@contextlib.contextmanager
def gathered(parameters: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Materialise ZeRO-3-partitioned parameters for the block (a collective: every rank must enter).

    With `modifier_rank`, that rank's in-place changes are re-partitioned on exit. Without ZeRO-3
    parameters this does nothing.
    """
    partitioned = [parameter for parameter in parameters if is_partitioned(parameter)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


@dataclass(frozen=True)
class _Piece:
    """The fragment's elements from `offset` on are `M[row : row + rows, column_start : column_end]`."""

    row: int
    rows: int
    column_start: int
    column_end: int
    offset: int

    @property
    def numel(self) -> int:
        return self.rows * (self.column_end - self.column_start)


def fragment_pieces(start: int, numel: int, row_length: int) -> list[_Piece]:
    """Split flat elements `[start, start + numel)` of a row-major matrix into rectangular pieces.

    At most three: a partial first row, a block of whole rows, a partial last row.
    """
    pieces, position, end = [], start, start + numel
    while position < end:
        row, column = divmod(position, row_length)
        if column == 0 and end - position >= row_length:
            rows = (end - position) // row_length
            pieces.append(_Piece(row, rows, 0, row_length, position - start))
            position += rows * row_length
        else:
            stop = min(end, (row + 1) * row_length)
            pieces.append(_Piece(row, 1, column, column + stop - position, position - start))
            position = stop
    return pieces


def add_fragment_coefficients(
    pieces: list[_Piece], fragment: torch.Tensor, basis: torch.Tensor, coefficients: torch.Tensor
) -> None:
    """`coefficients[rows] += piece @ U[columns]` for every piece: this fragment's share of `M U`."""
    for piece in pieces:
        block = fragment[piece.offset : piece.offset + piece.numel].view(piece.rows, -1)
        coefficients[piece.row : piece.row + piece.rows] += block @ basis[piece.column_start : piece.column_end]


def subtract_fragment_projection(
    pieces: list[_Piece], fragment: torch.Tensor, basis: torch.Tensor, residual: torch.Tensor
) -> None:
    """`fragment −= (its elements of) residual @ Uᵀ`, in place."""
    for piece in pieces:
        block = fragment[piece.offset : piece.offset + piece.numel].view(piece.rows, -1)
        block -= residual[piece.row : piece.row + piece.rows] @ basis[piece.column_start : piece.column_end].T


class _MasterFragment:
    """One constrained parameter's fp32 master fragment on this rank, and how to write it back."""

    def __init__(self, item: ConstrainedParameter):
        self.item = item
        self.rows, self.row_length = item.matrix_shape
        parameter = item.parameter
        if is_partitioned(parameter):
            self.stage3 = True
            optimizer = parameter._z3_optimizer
            partition_numel = parameter.ds_tensor.ds_numel
            _check_partition_group(optimizer._get_param_partition_group(parameter), item.name)
            # Private but exact: the rank's position in this parameter's partition group. The last
            # partition is padded past the parameter's end; the pieces never reach the padding.
            start = optimizer._get_param_partition_rank(parameter) * partition_numel
            numel = max(0, min(partition_numel, self.rows * self.row_length - start))
        elif hasattr(parameter, "_hp_mapping"):
            self.stage3 = False
            mapping = parameter._hp_mapping
            _check_partition_group(parameter._dp_group, item.name)
            start = mapping.lp_fragment_address.start if mapping is not None else 0
            numel = mapping.lp_fragment_address.numel if mapping is not None else 0
        else:
            raise RuntimeError(
                f"{item.name} has no DeepSpeed ZeRO master weights (no ds_id or _hp_mapping): the DeepSpeed "
                "engine does not optimise it, so the projection cannot reach its updates."
            )
        self.numel = numel
        self.pieces = fragment_pieces(start, numel, self.row_length) if numel else []
        # Where the master fragment lives: the accelerator, or the CPU under optimizer offload.
        item.move_to(self.master().device if numel else parameter.device)

    def master(self) -> torch.Tensor:
        """The fp32 master values this rank owns (ZeRO-3: its padded partition, a copy if offloaded)."""
        parameter = self.item.parameter
        if self.stage3:
            return parameter._z3_optimizer.get_local_fp32_param(parameter).view(-1)
        if parameter._hp_mapping is None:
            return torch.empty(0, dtype=torch.float32, device=self.item.basis.device)
        return parameter._hp_mapping.get_hp_fragment().view(-1)

    def subtract(self, master: torch.Tensor, residual: torch.Tensor) -> None:
        """Remove `(M U − A) Uᵀ` from the master fragment and make the module's copies agree."""
        basis = self.item.basis
        subtract_fragment_projection(self.pieces, master, basis, residual)
        parameter = self.item.parameter
        if self.stage3:
            parameter._z3_optimizer.set_local_hp_param(master, parameter)
            parameter.ds_tensor.data.copy_(master.view_as(parameter.ds_tensor))
        full = parameter.data
        if full.numel() == self.rows * self.row_length:
            # Same arithmetic on every rank, so the replicated copies stay identical to each other.
            matrix = full.view(self.rows, self.row_length)
            matrix.sub_((residual @ basis.T).to(device=matrix.device, dtype=matrix.dtype))


def _check_partition_group(group: dist.ProcessGroup | None, name: str) -> None:
    """The coefficient all-reduce spans the world, so the partitions must too (no MiCS/hpZ, no TP/PP)."""
    if dist.get_world_size(group=group) != dist.get_world_size():
        raise NotImplementedError(
            f"{name} is partitioned over a subgroup of the processes (MiCS, hpZ, or tensor/pipeline parallelism): "
            "trl-nullspace supports ZeRO data parallelism over all processes only."
        )


class ZeroMasterProjector:
    """Enforces `M U = A` on ZeRO master weights with one all-reduce of coefficients per step."""

    def __init__(self, constrained: list[ConstrainedParameter], communication_device: torch.device):
        self.communication_device = communication_device
        self.fragments = [_MasterFragment(item) for item in constrained]
        self.offsets, total = [], 0
        for fragment in self.fragments:
            self.offsets.append(total)
            total += fragment.rows * fragment.item.rank
        self.buffer_numel = total

    def _all_reduced_coefficients(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every parameter's full `M U` (d_out×k), summed over the ranks' fragments.

        Each block is computed where the master fragment lives and the buffer is reduced on the
        communication device (the accelerator; both are the CPU in CPU runs).
        """
        buffer = torch.zeros(self.buffer_numel, dtype=torch.float32, device=self.communication_device)
        masters, blocks = [], []
        for fragment, offset in zip(self.fragments, self.offsets, strict=True):
            block = buffer[offset : offset + fragment.rows * fragment.item.rank].view(fragment.rows, -1)
            master = fragment.master()
            if fragment.pieces:
                local = torch.zeros(block.shape, dtype=torch.float32, device=master.device)
                add_fragment_coefficients(fragment.pieces, master, fragment.item.basis, local)
                block.copy_(local)
            masters.append(master)
            blocks.append(block)
        dist.all_reduce(buffer)
        if not torch.isfinite(buffer).all():
            bad = [
                f.item.name for f, block in zip(self.fragments, blocks, strict=True) if not torch.isfinite(block).all()
            ]
            raise diverged_step_error(bad)
        return masters, blocks

    @torch.no_grad()
    def enforce_anchors(self) -> torch.Tensor:
        """`M ← M − (M U − A) Uᵀ` on the master weights; returns ‖M U − A‖ over all parameters.

        The norm stays a device tensor (read only when the trainer logs); the one host-device
        synchronisation per step is the divergence check on the reduced coefficients.
        """
        masters, blocks = self._all_reduced_coefficients()
        squares = []
        for fragment, master, block in zip(self.fragments, masters, blocks, strict=True):
            anchor = fragment.item.anchor
            residual = block.to(fragment.item.basis.device)
            if anchor is not None:
                residual = residual - anchor
            fragment.subtract(master, residual)
            # Blocks live where each master does (the CPU under optimizer offload): sum on one device.
            squares.append(residual.square().sum().to(self.communication_device))
        return torch.stack(squares).sum().sqrt()
