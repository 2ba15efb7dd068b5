"""Where one rank's fp32 master fragment of a ZeRO-partitioned weight sits, and how to project it.

DeepSpeed partitions each weight flattened row-major, so a rank's fragment is a slice of its
elements: at most three rectangles (a partial first row, whole rows, a partial last row). A row that
partition boundaries cut is completed from the other ranks' pieces (`zero` exchanges them); every
other row is projected where it lies. `MasterFragment` holds that geometry for one weight and
applies the projections to it; `master` and `in_step` decide when, and what travels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trl_nullspace.backends.zero.gather import is_partitioned
from trl_nullspace.projection.constrained import ConstrainedParameter
from trl_nullspace.projection.placements import host_copy


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


def rows_cut_by(boundaries: Iterable[int], row_length: int) -> list[int]:
    """The rows of a row-major matrix that the flat partition `boundaries` cut inside (a row cut
    once spans two ranks' fragments, a row cut more often spans more)."""
    return sorted({boundary // row_length for boundary in boundaries if boundary % row_length})


def add_fragment_coefficients(
    pieces: list[_Piece], fragment: torch.Tensor, basis: torch.Tensor, coefficients: torch.Tensor
) -> None:
    """`coefficients[rows] += piece @ U[columns]` for every piece: this fragment's share of `M U`."""
    for piece in pieces:
        block = fragment[piece.offset : piece.offset + piece.numel].view(piece.rows, -1)
        coefficients[piece.row : piece.row + piece.rows] += block @ basis[piece.column_start : piece.column_end]


def add_fragment_products(
    pieces: list[_Piece], target: torch.Tensor, coefficients: torch.Tensor, block: torch.Tensor
) -> None:
    """`target += (its elements of) coefficients @ blockᵀ`, in place: a fragment's part of a
    complement's `(·) N_b N_bᵀ`."""
    for piece in pieces:
        view = target[piece.offset : piece.offset + piece.numel].view(piece.rows, -1)
        view.addmm_(coefficients[piece.row : piece.row + piece.rows], block[piece.column_start : piece.column_end].T)


def subtract_fragment_projection(
    pieces: list[_Piece], fragment: torch.Tensor, basis: torch.Tensor, residual: torch.Tensor
) -> None:
    """`fragment −= (its elements of) residual @ Uᵀ`, in place."""
    for piece in pieces:
        block = fragment[piece.offset : piece.offset + piece.numel].view(piece.rows, -1)
        block -= residual[piece.row : piece.row + piece.rows] @ basis[piece.column_start : piece.column_end].T


class MasterFragment:
    """One constrained parameter's fp32 master fragment on this rank, and how to write it back.

    Its coefficients cover rows `[first_row, first_row + local_rows)` of `M U`; `pieces` index them from
    `first_row`. `exchanged_rows` are the rows whose sums the all-reduce completes: all of them when
    the module weight is replicated, else those cut by partition boundaries (the same on every rank).
    """

    def __init__(self, item: ConstrainedParameter, stage12_boundaries: list[int] | None = None):
        self.item = item
        self.rows, self.row_length = item.matrix_shape
        size = self.rows * self.row_length
        parameter = item.parameter
        if is_partitioned(parameter):
            self.stage3 = True
            optimizer = parameter._z3_optimizer
            partition_numel = parameter.ds_tensor.ds_numel
            group_size = _check_partition_group(optimizer._get_param_partition_group(parameter), item.name)
            # Private but exact: the rank's position in this parameter's partition group. The last
            # partition is padded past the parameter's end; the pieces never reach the padding.
            start = optimizer._get_param_partition_rank(parameter) * partition_numel
            numel = max(0, min(partition_numel, size - start))
            self.replicated = bool(getattr(parameter, "ds_persist", False))
            boundaries = [rank * partition_numel for rank in range(1, group_size) if rank * partition_numel < size]
        elif hasattr(parameter, "_hp_mapping"):
            self.stage3 = False
            _check_partition_group(parameter._dp_group, item.name)
            start, numel = stage12_fragment(parameter)
            # Projected inside DeepSpeed's step (`backends.zero.in_step`), before it copies and all-gathers the
            # masters into the module's copies, each rank needs its own rows only; projected after the
            # step, every rank must correct its whole module copy.
            self.replicated = stage12_boundaries is None
            boundaries = stage12_boundaries or []
        else:
            raise RuntimeError(
                f"{item.name} has no DeepSpeed ZeRO master weights (no ds_id or _hp_mapping): the DeepSpeed "
                "engine does not optimise it, so the projection cannot reach its updates."
            )
        # Where the master fragment lives: the accelerator, or the CPU under optimizer offload.
        item.move_to(self.master().device if numel else parameter.device)
        if self.replicated:
            self.first_row, self.local_rows = 0, self.rows
            self.exchanged_rows = list(range(self.rows))
        else:
            self.first_row = start // self.row_length if numel else 0
            self.local_rows = -(-(start + numel) // self.row_length) - self.first_row if numel else 0
            self.exchanged_rows = rows_cut_by(boundaries, self.row_length)
            # Where the exchanged rows this fragment covers sit in the buffer block and in its rows.
            covered = [
                (slot, row - self.first_row)
                for slot, row in enumerate(self.exchanged_rows)
                if self.first_row <= row < self.first_row + self.local_rows
            ]
            device = item.device
            self.exchanged_slots = torch.tensor([slot for slot, _ in covered], dtype=torch.long, device=device)
            self.exchanged_local = torch.tensor([row for _, row in covered], dtype=torch.long, device=device)
            item.keep_anchor_rows(self.first_row, self.local_rows)  # the anchors split over the ranks too
        self.pieces = [
            dataclasses.replace(piece, row=piece.row - self.first_row)
            for piece in (fragment_pieces(start, numel, self.row_length) if numel else [])
        ]

    @property
    def holds_rows(self) -> bool:
        """Whether this rank projects any of the weight's rows (its partition reaches the weight, or it
        keeps the whole weight): if not, no projection here reads the weight's basis."""
        return bool(self.pieces) or self.replicated

    def exchanged_slot(self, piece: _Piece) -> int | None:
        """Where `piece`'s first row sits among the exchanged rows, if it is one (all rows are, for a
        weight every rank keeps whole; else only the rows a partition boundary cuts)."""
        if self.replicated:
            return piece.row
        if piece.column_end - piece.column_start == self.row_length:
            return None  # whole rows: no boundary inside them
        return self.exchanged_rows.index(self.first_row + piece.row)

    @property
    def projects_change(self) -> bool:
        """Whether the update projection works on the change since a recorded point (a complement basis: since
        last projected; step snapshots: since just before the step) rather than on the weights and an anchor."""
        return self.item.shared.complement or self.item.step_snapshots

    def take_previous(self) -> None:
        """With a complement basis or step snapshots: record this fragment's master values now
        (`ConstrainedParameter.take_previous`)."""
        if self.projects_change:
            master = self.master()
            self.previous = host_copy(master) if self.item.shared.offloaded else master.clone()

    def exchange_values(self, master: torch.Tensor) -> torch.Tensor:
        """What the cut rows' pieces exchange: the weights, or with a complement basis or step snapshots their
        change since the recorded point (the projection needs `(M − P) N` or `(M − S) U`, from whole rows)."""
        if not self.projects_change:
            return master
        previous = getattr(self, "previous", None)
        if previous is None:
            raise RuntimeError(
                f"{self.item.name}: no weights recorded before the step (take_previous was not called)."
            )
        return master - previous.to(master.device, non_blocking=True)

    def enforce_with_complement(
        self, master: torch.Tensor, change: torch.Tensor, exchanged: torch.Tensor
    ) -> torch.Tensor:
        """`M ← P + (M − P) N Nᵀ` on this fragment (and the module's whole copy, if kept), block by
        block of `N`; cut rows' changes come whole from `exchanged`. Returns the squared norm removed."""
        item, parameter = self.item, self.item.parameter
        if not self.holds_rows:
            item.shared.take_part_in_gathers()
            return torch.zeros((), dtype=torch.float32, device=master.device)
        kept = torch.zeros_like(change)
        kept_whole = torch.zeros_like(exchanged) if self.replicated else None
        for block in item.shared.blocks(master.device, torch.float32):
            coefficients = self._row_products(change, exchanged, block)
            add_fragment_products(self.pieces, kept, coefficients, block)
            if kept_whole is not None:
                kept_whole.addmm_(coefficients, block.T)
        removed_sq = (change - kept).square().sum()
        previous = self.previous.to(master.device, non_blocking=True)
        master.copy_(previous + kept)
        if not item.step_snapshots:  # a snapshot is freed by the caller instead; the next step takes its own
            self.previous.copy_(master, non_blocking=True)
        if kept_whole is not None:
            matrix = parameter.data.view(self.rows, self.row_length)
            matrix.sub_((exchanged - kept_whole).to(device=matrix.device, dtype=matrix.dtype))
        self.write_back(master)
        return removed_sq

    def _row_products(self, values: torch.Tensor, exchanged: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """`rows @ block` for this fragment's rows of the matrix `values` holds a fragment of: whole
        rows from `values` itself, cut rows from their completed copies in `exchanged`."""
        if self.replicated:
            return exchanged @ block
        products = torch.empty(self.local_rows, block.shape[1], dtype=torch.float32, device=block.device)
        for piece in self.pieces:
            slot = self.exchanged_slot(piece)
            if slot is None:  # whole rows of this fragment
                rows = values[piece.offset : piece.offset + piece.numel].view(piece.rows, -1)
            else:  # a cut row, completed by the other ranks' pieces
                rows = exchanged[slot : slot + 1]
            products[piece.row : piece.row + piece.rows] = rows @ block
        return products

    def enforce_streamed(self, master: torch.Tensor, exchanged: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """`M ← M − (M U − A) Uᵀ` on this fragment (and the module's whole copy, if kept), one
        column block of `U` at a time, `values` being `exchange_values(M)`: the weights themselves, or
        with step snapshots their change `M − S` (no anchor: `M ← M − ((M − S) U) Uᵀ`). Cut rows' products
        come from their completed copies in `exchanged`. Returns the squared norm removed on this fragment's rows."""
        item, parameter = self.item, self.item.parameter
        squares = torch.zeros((), dtype=torch.float32, device=master.device)
        if not self.holds_rows:
            item.shared.take_part_in_gathers()
            return squares
        anchor = item.anchor_state
        for index, block in enumerate(item.shared.blocks(master.device, torch.float32)):
            coefficients = self._row_products(values, exchanged, block)
            if anchor is not None:
                rows = slice(self.first_row, self.first_row + self.local_rows)
                coefficients -= anchor.block(index, rows).to(block.device, non_blocking=True)
            subtract_fragment_projection(self.pieces, master, block, coefficients)
            if self.replicated:
                matrix = parameter.data.view(self.rows, self.row_length)
                matrix.sub_((coefficients @ block.T).to(device=matrix.device, dtype=matrix.dtype))
            squares += coefficients.square().sum()
        self.write_back(master)
        return squares

    def project_gradient_in_blocks(self, gradient: torch.Tensor, exchanged: torch.Tensor) -> None:
        """`G ← G − (G U) Uᵀ` on this fragment's gradient one column block of `U` at a time (the
        blocks are orthonormal, so each leaves the others' products unchanged), or `G ← G N Nᵀ` with
        a complement `N`; cut rows' products come from their completed copies in `exchanged`."""
        shared = self.item.shared
        if not self.holds_rows:
            shared.take_part_in_gathers()
            return
        kept = torch.zeros_like(gradient) if shared.complement else None
        for block in shared.blocks(gradient.device, torch.float32):
            coefficients = self._row_products(gradient, exchanged, block)
            if kept is None:
                subtract_fragment_projection(self.pieces, gradient, block, coefficients)
            else:
                add_fragment_products(self.pieces, kept, coefficients, block)
        if kept is not None:
            gradient.copy_(kept)

    def project_gradient(self, gradient: torch.Tensor, coefficients: torch.Tensor) -> None:
        """`G ← G − (G U) Uᵀ` on this fragment's gradient, given its completed rows of `G U`. Unlike
        the masters', nothing is written back here: the caller's `zero.GradientAccess` stores it."""
        if not self.holds_rows:
            return
        subtract_fragment_projection(self.pieces, gradient, self.item.basis, coefficients)

    def write_back(self, master: torch.Tensor) -> None:
        """Store the projected master: ZeRO-3's may be a copy (offloaded) and has a low-precision
        partition of its own to update; ZeRO-1/2's is a view of the flat partition, which DeepSpeed
        copies into the module itself."""
        if self.stage3:
            parameter = self.item.parameter
            parameter._z3_optimizer.set_local_hp_param(master, parameter)
            parameter.ds_tensor.data.copy_(master.view_as(parameter.ds_tensor))

    def stage12_gradient(self, flat_gradient: torch.Tensor) -> torch.Tensor:
        """This rank's fp32 gradient of its fragment, in ZeRO-1/2's flat gradient partition of the
        group, where the master fragment sits in its flat master partition (empty outside it)."""
        mapping = self.item.parameter._hp_mapping
        if mapping is None:
            return torch.empty(0, dtype=torch.float32, device=flat_gradient.device)
        return flat_gradient.narrow(0, mapping.hp_fragment_address.start, mapping.hp_fragment_address.numel)

    def master(self) -> torch.Tensor:
        """The fp32 master values this rank owns (ZeRO-3: its padded partition, a copy if offloaded)."""
        parameter = self.item.parameter
        if self.stage3:
            return parameter._z3_optimizer.get_local_fp32_param(parameter).view(-1)
        if parameter._hp_mapping is None:
            return torch.empty(0, dtype=torch.float32, device=self.item.device)
        return parameter._hp_mapping.get_hp_fragment().view(-1)

    def local_coefficients(self, master: torch.Tensor) -> torch.Tensor:
        """This fragment's share of `M U` on its rows (complete except on the exchanged rows)."""
        if not self.holds_rows:
            return torch.zeros(0, self.item.rank, dtype=torch.float32, device=self.item.device)
        basis = self.item.basis
        coefficients = torch.zeros(self.local_rows, basis.shape[1], dtype=torch.float32, device=basis.device)
        add_fragment_coefficients(self.pieces, master, basis, coefficients)
        return coefficients

    def residual(self, coefficients: torch.Tensor) -> torch.Tensor:
        """`M U − A` on this fragment's rows."""
        anchor = self.item.anchor_state
        if anchor is None:
            return coefficients
        return coefficients - anchor.rows(self.first_row, self.local_rows)

    def subtract(self, master: torch.Tensor, residual: torch.Tensor) -> None:
        """Remove `(M U − A) Uᵀ` from the master fragment and make the module's copies agree."""
        if not self.holds_rows:
            return
        basis = self.item.basis
        subtract_fragment_projection(self.pieces, master, basis, residual)
        self.write_back(master)
        parameter = self.item.parameter
        if self.replicated:
            # Same arithmetic on every rank, so the replicated copies stay identical to each other.
            matrix = parameter.data.view(self.rows, self.row_length)
            matrix.sub_((residual @ basis.T).to(device=matrix.device, dtype=matrix.dtype))


def stage12_fragment(parameter: torch.nn.Parameter) -> tuple[int, int]:
    """Where this rank's ZeRO-1/2 master fragment starts in the flattened parameter, and its length
    (0, 0 for a parameter outside this rank's partition)."""
    mapping = parameter._hp_mapping
    if mapping is None:
        return 0, 0
    return mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel


def _check_partition_group(group: dist.ProcessGroup | None, name: str) -> int:
    """The coefficient all-reduce spans the world, so the partitions must too (no MiCS/hpZ, no TP/PP).

    Returns the number of partitions.
    """
    size = dist.get_world_size(group=group)
    if size != dist.get_world_size():
        raise NotImplementedError(
            f"{name} is partitioned over a subgroup of the processes (MiCS, hpZ, or tensor/pipeline parallelism): "
            "trl-nullspace supports ZeRO data parallelism over all processes only."
        )
    return size
