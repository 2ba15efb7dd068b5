"""DeepSpeed ZeRO-1/2/3: the `update` projection applied to the optimizer's partitioned master weights.

Under ZeRO the optimizer steps fp32 master weights of which each rank holds one contiguous fragment
(a slice of the parameter flattened row-major). The module's tensors are only a low-precision copy:
full on every rank under ZeRO-1/2 and for ZeRO-3's small "persistent" parameters, partitioned like
the master otherwise. Projecting the module's tensors would be overwritten by the next step.

Per optimizer step, for every constrained parameter seen as a matrix `M` (rows of length `n`,
orthonormal basis `U` n×k, anchor `A = M₀ U`):
 1. each rank computes its fragment's share of `M U` for the rows the fragment covers (a row
    the fragment covers only in part gets a partial sum, completed by the other ranks' shares);
 2. one all-reduce (sum) of one fp32 buffer completes the rows that need it. Where a rank must
    correct a whole module copy after the step (ZeRO-3's persistent parameters; ZeRO-1/2 when the
    projection cannot run inside DeepSpeed's step, `zero_in_step`) all d_out×k coefficients travel.
    Otherwise only the rows that partition boundaries cut in two travel (at most one per boundary),
    and every other row is complete on the one rank that holds it. The weights and gradients
    themselves never travel;
 3. every rank subtracts its rows of `(M U − A) Uᵀ` from its own master fragment, copies it into
    its ZeRO-3 low-precision partition and, where it corrects a whole module copy, subtracts the
    same from it, so replicas match the masters before the next forward. Inside ZeRO-1/2's step,
    DeepSpeed's own copy and all-gather carry the projected masters to every module copy.
The extra memory is the bases (whole on every rank), the anchors (the rows a rank holds, gathered
whole again for checkpoints; whole where a module copy is corrected), the coefficients of the rows
each rank covers and the buffer.

`RowExchangeZeroProjector` is the variant for offloaded bases and complement bases (ZeRO-3, and
ZeRO-1/2 inside DeepSpeed's step): the split rows' values (or changes) travel instead of
coefficients, and each rank then projects its fragment alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trl_nullspace.basis import gather_anchors, host_copy
from trl_nullspace.projector import ConstrainedParameter, diverged_step_error
from trl_nullspace.zero_gather import is_partitioned


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


def projected_in_place(
    fragments: list[MasterFragment],
    gradients: list[torch.Tensor],
    completed: list[torch.Tensor],
    project: Callable[[MasterFragment, torch.Tensor, torch.Tensor], None],
    device: torch.device,
) -> torch.Tensor:
    """Apply `project(fragment, gradient, its completed rows or coefficients)` to every fragment's
    gradient in place; returns the squared norm it removed, summed over the ranks (a collective),
    which the clipping must account for."""
    removed = torch.zeros((), dtype=torch.float32, device=device)
    for fragment, gradient, exchanged in zip(fragments, gradients, completed, strict=True):
        before = gradient.square().sum()
        project(fragment, gradient, exchanged.to(gradient.device))
        removed += (before - gradient.square().sum()).to(device)
    dist.all_reduce(removed)
    return removed


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
            # Projected inside DeepSpeed's step (`zero_in_step`), before it copies and all-gathers the
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

    def exchanged_slot(self, piece: _Piece) -> int | None:
        """Where `piece`'s first row sits among the exchanged rows, if it is one (all rows are, for a
        weight every rank keeps whole; else only the rows a partition boundary cuts)."""
        if self.replicated:
            return piece.row
        if piece.column_end - piece.column_start == self.row_length:
            return None  # whole rows: no boundary inside them
        return self.exchanged_rows.index(self.first_row + piece.row)

    def take_previous(self) -> None:
        """With a complement basis: record this fragment's master values now (`ConstrainedParameter.take_previous`)."""
        if self.item.shared.complement:
            master = self.master()
            self.previous = host_copy(master) if self.item.shared.offloaded else master.clone()

    def exchange_values(self, master: torch.Tensor) -> torch.Tensor:
        """What the cut rows' pieces exchange: the weights, or with a complement basis their change
        since last projected (the projection needs `(M − P) N`, from whole rows)."""
        if not self.item.shared.complement:
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
        if not self.pieces and not self.replicated:
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

    def enforce_streamed(self, master: torch.Tensor, exchanged: torch.Tensor) -> torch.Tensor:
        """`M ← M − (M U − A) Uᵀ` on this fragment (and the module's whole copy, if kept), one
        column block of `U` at a time; cut rows' coefficients come from their completed copies in
        `exchanged`. Returns the squared norm of `M U − A` on this fragment's rows."""
        item, parameter = self.item, self.item.parameter
        squares = torch.zeros((), dtype=torch.float32, device=master.device)
        if not self.pieces and not self.replicated:
            return squares
        anchor = item.anchor_state
        for index, block in enumerate(item.shared.blocks(master.device, torch.float32)):
            coefficients = self._row_products(master, exchanged, block)
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
        kept = torch.zeros_like(gradient) if shared.complement else None
        for block in shared.blocks(gradient.device, torch.float32):
            coefficients = self._row_products(gradient, exchanged, block)
            if kept is None:
                subtract_fragment_projection(self.pieces, gradient, block, coefficients)
            else:
                add_fragment_products(self.pieces, kept, coefficients, block)
        if kept is not None:
            gradient.copy_(kept)

    def write_back(self, master: torch.Tensor) -> None:
        """Store the projected master: ZeRO-3's may be a copy (offloaded) and has a low-precision
        partition of its own to update; ZeRO-1/2's is a view of the flat partition, which DeepSpeed
        copies into the module itself."""
        if self.stage3:
            parameter = self.item.parameter
            parameter._z3_optimizer.set_local_hp_param(master, parameter)
            parameter.ds_tensor.data.copy_(master.view_as(parameter.ds_tensor))

    def gradient(self, flat_gradient: torch.Tensor) -> torch.Tensor:
        """This rank's fp32 gradient of its fragment: ZeRO-1/2's flat gradient partition of the
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
        basis = self.item.basis
        subtract_fragment_projection(self.pieces, master, basis, residual)
        self.write_back(master)
        parameter = self.item.parameter
        if self.replicated:
            # Same arithmetic on every rank, so the replicated copies stay identical to each other.
            matrix = parameter.data.view(self.rows, self.row_length)
            matrix.sub_((residual @ basis.T).to(device=matrix.device, dtype=matrix.dtype))


def all_reduce_or_raise_together(
    buffer: torch.Tensor, fragments: list[MasterFragment], checks: list[torch.Tensor]
) -> None:
    """Sum `buffer` over the ranks, its last value first set to whether any of this rank's `checks`
    (one per fragment) is NaN or inf, and raise on every rank if any rank's was: one rank raising
    alone would leave the others waiting in the next collective."""
    if checks:
        buffer[-1] = (~torch.isfinite(torch.stack(checks).sum())).float()
    dist.all_reduce(buffer)
    if buffer[-1] > 0:
        bad = [fragment.item.name for fragment, check in zip(fragments, checks, strict=True) if not check.isfinite()]
        raise diverged_step_error(bad)


def anchor_rows_kept(fragments: list[MasterFragment]) -> str:
    """How many of the anchors' rows this rank keeps, for the log."""
    anchors = [f.item.anchor_state for f in fragments if f.item.anchor_state is not None]
    kept = sum(anchor.blocks[0].shape[0] for anchor in anchors)
    return f"this rank keeps {kept} of {sum(anchor.total_rows for anchor in anchors)} anchor rows"


def fragments_anchors(fragments: list[MasterFragment], device: torch.device) -> dict[str, torch.Tensor]:
    """The whole anchors of the fragments' weights, gathered from the rows each rank keeps."""
    anchors = {f.item.name: f.item.anchor_state for f in fragments if f.item.anchor_state is not None}
    return gather_anchors(anchors, device)


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


class ZeroMasterProjector:
    """Enforces `M U = A` on ZeRO master weights with one all-reduce of coefficients per step."""

    def __init__(
        self,
        constrained: list[ConstrainedParameter],
        communication_device: torch.device,
        stage12_boundaries: dict[str, list[int]] | None = None,
    ):
        self.communication_device = communication_device
        boundaries = stage12_boundaries or {}
        self.fragments = [MasterFragment(item, boundaries.get(item.name)) for item in constrained]
        self.offsets, total = [], 0
        for fragment in self.fragments:
            self.offsets.append(total)
            total += len(fragment.exchanged_rows) * fragment.item.rank
        self.exchanged_numel = total
        self.whole_numel = sum(fragment.rows * fragment.item.rank for fragment in self.fragments)

    def full_anchors(self) -> dict[str, torch.Tensor]:
        """The whole anchors from every rank's rows, for a checkpoint (a collective)."""
        return fragments_anchors(self.fragments, self.communication_device)

    def summary(self) -> str:
        """What travels per step, for the log: the exchanged share of all coefficients."""
        partitioned = sum(not fragment.replicated for fragment in self.fragments)
        return (
            f"ZeRO projection all-reduces {self.exchanged_numel} of {self.whole_numel} coefficients per step "
            f"({partitioned} of {len(self.fragments)} weights partitioned); {anchor_rows_kept(self.fragments)}"
        )

    def _completed_coefficients(self, values: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every fragment's rows of `M U` (`values`: each fragment's master, or its gradient),
        completed by one all-reduce.

        Coefficients are computed where each master fragment lives; the buffer is reduced on the
        communication device (the accelerator; both are the CPU in CPU runs). Its last value counts
        the ranks whose coefficients hold NaN or inf, so that all ranks raise together: one raising
        alone would leave the others waiting in the next collective.
        """
        buffer = torch.zeros(self.exchanged_numel + 1, dtype=torch.float32, device=self.communication_device)
        coefficients, exchanged_blocks, norms = [], [], []
        for fragment, offset, master in zip(self.fragments, self.offsets, values, strict=True):
            k = fragment.item.rank
            exchanged = buffer[offset : offset + len(fragment.exchanged_rows) * k].view(-1, k)
            local = fragment.local_coefficients(master)
            norms.append(torch.linalg.vector_norm(local).to(self.communication_device))
            if fragment.replicated:  # every row travels: the reduced buffer block is the result
                exchanged.copy_(local)
                local = exchanged
            else:
                exchanged.index_copy_(
                    0,
                    fragment.exchanged_slots.to(exchanged.device),
                    local.index_select(0, fragment.exchanged_local).to(exchanged.device),
                )
            coefficients.append(local)
            exchanged_blocks.append(exchanged)
        all_reduce_or_raise_together(buffer, self.fragments, norms)
        for fragment, local, exchanged in zip(self.fragments, coefficients, exchanged_blocks, strict=True):
            if not fragment.replicated:
                completed = exchanged.index_select(0, fragment.exchanged_slots.to(exchanged.device))
                local.index_copy_(0, fragment.exchanged_local, completed.to(local.device))
        return coefficients

    @torch.no_grad()
    def enforce_anchors(self) -> torch.Tensor:
        """`M ← M − (M U − A) Uᵀ` on the master weights; returns ‖M U − A‖ over this rank's rows.

        The norm stays a device tensor (read only when the trainer logs); the one host-device
        synchronisation per step is the divergence check after the all-reduce. Rows of ZeRO-3
        partitioned weights count on the ranks that hold them, so the main process logs its share.
        """
        masters = [fragment.master() for fragment in self.fragments]
        coefficients = self._completed_coefficients(masters)
        squares = []
        for fragment, master, local in zip(self.fragments, masters, coefficients, strict=True):
            residual = fragment.residual(local.to(fragment.item.basis.device))
            fragment.subtract(master, residual)
            # Fragments live where their masters do (the CPU under optimizer offload): sum on one device.
            squares.append(residual.square().sum().to(self.communication_device))
        return torch.stack(squares).sum().sqrt()

    @torch.no_grad()
    def project_gradients(self, flat_gradient: torch.Tensor) -> torch.Tensor:
        """`G ← G − (G U) Uᵀ` on this rank's fragments of a ZeRO-1/2 group's flat fp32 gradient
        partition (inside DeepSpeed's step, `zero_in_step`); returns the squared norm removed, summed
        over the ranks (a second collective), which the clipping must account for."""
        gradients = [fragment.gradient(flat_gradient) for fragment in self.fragments]
        coefficients = self._completed_coefficients(gradients)
        return projected_in_place(
            self.fragments, gradients, coefficients, MasterFragment.subtract, self.communication_device
        )


class RowExchangeZeroProjector:
    """ZeRO with `nullspace_offload` or complement bases (`nullspace_basis_storage: smaller`): each
    weight is projected block by block (`SharedBasis`), so no rank ever holds a whole offloaded basis
    on the accelerator, and a complement needs whole rows of the change rather than coefficients.

    Coefficients cannot be exchanged per block without one collective per block, so the rows that
    partition boundaries cut travel instead: each rank writes its pieces of those rows into one fp32
    buffer (at most one row per boundary per weight; every row of the small weights ZeRO-3 keeps
    whole), one all-reduce completes them, and then every rank projects its own fragment with no
    further communication, a cut row through its completed copy. Every rank holding a piece of a
    cut row computes the same coefficients from the same values, so the pieces stay consistent.
    """

    def __init__(
        self,
        constrained: list[ConstrainedParameter],
        communication_device: torch.device,
        stage12_boundaries: dict[str, list[int]] | None = None,
    ):
        self.communication_device = communication_device
        boundaries = stage12_boundaries or {}
        self.fragments = [MasterFragment(item, boundaries.get(item.name)) for item in constrained]
        replicated = [fragment.item.name for fragment in self.fragments if fragment.replicated and not fragment.stage3]
        if replicated:
            raise NotImplementedError(
                f"nullspace_offload and nullspace_basis_storage='smaller' under ZeRO-1/2 need the projection inside "
                f"DeepSpeed's step ({replicated[0]} would exchange every row after it), which this DeepSpeed "
                "optimizer does not allow (a torch autocast GradScaler or ZenFlow steps it, or it is the BF16 "
                "optimizer of ZeRO-1 with fp32 gradient accumulation). Use ZeRO-3 or FSDP2 with them, turn those "
                "DeepSpeed options off, or turn them off."
            )
        self.offsets, total = [], 0
        for fragment in self.fragments:
            self.offsets.append(total)
            total += len(fragment.exchanged_rows) * fragment.row_length
        self.exchanged_numel = total
        self.whole_numel = sum(fragment.rows * fragment.row_length for fragment in self.fragments)

    def full_anchors(self) -> dict[str, torch.Tensor]:
        """The whole anchors from every rank's rows, for a checkpoint (a collective)."""
        return fragments_anchors(self.fragments, self.communication_device)

    def take_previous(self) -> None:
        """With complement bases: record every fragment's master values before training."""
        for fragment in self.fragments:
            fragment.take_previous()

    def summary(self) -> str:
        """What travels per step, for the log."""
        complements = sum(fragment.item.shared.complement for fragment in self.fragments)
        where = "host memory" if any(f.item.shared.offloaded for f in self.fragments) else "the accelerator"
        return (
            f"ZeRO projection all-reduces {self.exchanged_numel} of {self.whole_numel} weight values per step "
            f"(the rows partitions split); bases from {where}, {complements} of {len(self.fragments)} as "
            f"complements; {anchor_rows_kept(self.fragments)}"
        )

    def _completed_rows(self, exchanged_values: list[torch.Tensor], checked: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every fragment's exchanged rows of `exchanged_values` made whole by one all-reduce (last
        value: the ranks where one of `checked` holds NaN or inf, so that all ranks raise together)."""
        buffer = torch.zeros(self.exchanged_numel + 1, dtype=torch.float32, device=self.communication_device)
        rows, sums = [], []
        for fragment, offset, values, check in zip(
            self.fragments, self.offsets, exchanged_values, checked, strict=True
        ):
            block = buffer[offset : offset + len(fragment.exchanged_rows) * fragment.row_length]
            block = block.view(-1, fragment.row_length)
            for piece in fragment.pieces:
                slot = fragment.exchanged_slot(piece)
                if slot is not None:
                    piece_values = values[piece.offset : piece.offset + piece.numel].view(piece.rows, -1)
                    block[slot : slot + piece.rows, piece.column_start : piece.column_end] = piece_values.to(
                        block.device
                    )
            sums.append(check.sum().to(self.communication_device))
            rows.append(block)
        all_reduce_or_raise_together(buffer, self.fragments, sums)
        return rows

    @torch.no_grad()
    def project_gradients(self, flat_gradient: torch.Tensor) -> torch.Tensor:
        """`G ← G − (G U) Uᵀ` (a complement: `G ← G N Nᵀ`) on this rank's fragments of a ZeRO-1/2
        group's flat fp32 gradient partition, block by block, the cut rows exchanged whole first;
        returns the squared norm removed, summed over the ranks."""
        gradients = [fragment.gradient(flat_gradient) for fragment in self.fragments]
        rows = self._completed_rows(gradients, gradients)
        return projected_in_place(
            self.fragments, gradients, rows, MasterFragment.project_gradient_in_blocks, self.communication_device
        )

    @torch.no_grad()
    def enforce_anchors(self) -> torch.Tensor:
        """`M ← M − (M U − A) Uᵀ` on the master weights (with a complement, `M ← P + (M − P) N Nᵀ`),
        block by block; returns the norm removed over this rank's rows (a device tensor, read only
        when the trainer logs)."""
        masters = [fragment.master() for fragment in self.fragments]
        changes = [fragment.exchange_values(master) for fragment, master in zip(self.fragments, masters, strict=True)]
        completed = self._completed_rows(changes, masters)
        squares = [torch.zeros((), dtype=torch.float32, device=self.communication_device)]
        for fragment, master, change, rows in zip(self.fragments, masters, changes, completed, strict=True):
            rows = rows.to(master.device)
            if fragment.item.shared.complement:
                removed = fragment.enforce_with_complement(master, change, rows)
            else:
                removed = fragment.enforce_streamed(master, rows)
            squares.append(removed.to(self.communication_device))
        return torch.stack(squares).sum().sqrt()
