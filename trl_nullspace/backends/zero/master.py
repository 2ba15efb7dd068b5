"""DeepSpeed ZeRO-1/2/3: the projections applied to the optimizer's partitioned fp32 masters (and,
inside ZeRO-1/2's step, gradients); where each rank's fragment lies is `fragments`'.

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
    projection cannot run inside DeepSpeed's step, `backends.zero.in_step`) all d_out×k coefficients travel.
    Otherwise only the rows that partition boundaries cut in two travel (at most one per boundary),
    and every other row is complete on the one rank that holds it. The weights and gradients
    themselves never travel;
 3. every rank subtracts its rows of `(M U − A) Uᵀ` from its own master fragment, copies it into
    its ZeRO-3 low-precision partition and, where it corrects a whole module copy, subtracts the
    same from it, so replicas match the masters before the next forward. Inside ZeRO-1/2's step,
    DeepSpeed's own copy and all-gather carry the projected masters to every module copy.
The extra memory is the bases (whole on every rank, except those a ZeRO-1/2 rank's fragments
never read, `in_step.release_unread_bases`, or split by rows with `nullspace_shard_bases` under
ZeRO-3), the anchors (the rows a rank holds, gathered whole again for checkpoints; whole where a
module copy is corrected), the coefficients of the rows each rank covers and the buffer.

`RowExchangeZeroProjector` is the variant for offloaded bases, complement bases (ZeRO-3, and
ZeRO-1/2 inside DeepSpeed's step) and bases split over the ranks (ZeRO-3): the split rows' values
(or changes) travel instead of coefficients, and each rank then projects its fragment alone, one
column block at a time, so a split basis can be gathered a block at a time with no collective but
the gather per block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import torch
import torch.distributed as dist

from trl_nullspace.backends.split_bases import distinct_bases, grouped_by_basis, split_bases, with_bases_gathered
from trl_nullspace.backends.zero.fragments import MasterFragment
from trl_nullspace.projection.anchors import gather_anchors
from trl_nullspace.projection.constrained import ConstrainedParameter, diverged_step_error
from trl_nullspace.projection.placements import FP32_BYTES


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


def projected_in_place(
    fragments: Iterable[MasterFragment],
    access: GradientAccess,
    completed: Iterable[torch.Tensor],
    project: Callable[[MasterFragment, torch.Tensor, torch.Tensor], None],
    device: torch.device,
) -> torch.Tensor:
    """Apply `project(fragment, gradient, its completed rows or coefficients)` to every fragment's
    gradient, read and written one fragment at a time through `access`; returns the squared norm it
    removed, summed over the ranks (a collective), which a redone clipping needs."""
    removed = torch.zeros((), dtype=torch.float32, device=device)
    for fragment, exchanged in zip(fragments, completed, strict=True):
        gradient = access.read(fragment)
        before = gradient.square().sum()
        project(fragment, gradient, exchanged.to(gradient.device))
        removed += (before - gradient.square().sum()).to(device)
        access.write(fragment, gradient)
    dist.all_reduce(removed)
    return removed


class GradientAccess(Protocol):
    """How a projector reaches this rank's fp32 gradient of each fragment, laid out as its master.

    ZeRO-1/2's are views of the flat gradient partition (writing is a no-op); ZeRO-3's may be fp32
    copies of a low-precision or offloaded partition, read one fragment at a time so that no more
    than one weight's copy is held at once, and written back after its projection."""

    def read(self, fragment: MasterFragment) -> torch.Tensor: ...

    def write(self, fragment: MasterFragment, gradient: torch.Tensor) -> None: ...


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

    def _completed_coefficients(self, values: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """Every fragment's rows of `M U` (`values`: each fragment's master, or its gradient, in the
        fragments' order; each is read once), completed by one all-reduce.

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
            residual = fragment.residual(local.to(fragment.item.device))
            fragment.subtract(master, residual)
            # Fragments live where their masters do (the CPU under optimizer offload): sum on one device.
            squares.append(residual.square().sum().to(self.communication_device))
        return torch.stack(squares).sum().sqrt()

    @torch.no_grad()
    def project_gradients(self, access: GradientAccess) -> torch.Tensor:
        """`G ← G − (G U) Uᵀ` on this rank's fp32 gradient fragments (inside DeepSpeed's step:
        `in_step`, `step_start`), each read twice through `access`: once for its coefficients,
        once to project it after the all-reduce completed them. Returns the squared norm removed,
        summed over the ranks (a second collective), which a redone clipping needs."""
        coefficients = self._completed_coefficients(access.read(fragment) for fragment in self.fragments)
        return projected_in_place(
            self.fragments, access, coefficients, MasterFragment.project_gradient, self.communication_device
        )


def exchanged_numel(fragment: MasterFragment) -> int:
    """The values of `fragment`'s rows that partitions cut, which travel in its exchange."""
    return len(fragment.exchanged_rows) * fragment.row_length


def exchange_runs(fragments: list[MasterFragment], block_bytes: int | None) -> list[slice]:
    """`fragments` cut, in order, into runs whose exchanged rows fit in `block_bytes` of fp32 (a fragment
    larger than that alone; None: one run). The same on every rank: the cut rows are known to all."""
    if block_bytes is None:
        return [slice(0, len(fragments))]
    runs, start, held = [], 0, 0
    for index, fragment in enumerate(fragments):
        size = exchanged_numel(fragment) * FP32_BYTES
        if held and held + size > block_bytes:
            runs.append(slice(start, index))
            start, held = index, 0
        held += size
    runs.append(slice(start, len(fragments)))
    return runs


class RowExchangeZeroProjector:
    """ZeRO with `nullspace_offload` or complement bases (`nullspace_basis_storage: smaller`): each
    weight is projected block by block (`SharedBasis`), so no rank ever holds a whole offloaded basis
    on the accelerator, and a complement needs whole rows of the change rather than coefficients.

    Coefficients cannot be exchanged per block without one collective per block, so the rows that
    partition boundaries cut travel instead: each rank writes its pieces of those rows into an fp32
    buffer (at most one row per boundary per weight; every row of the small weights ZeRO-3 keeps
    whole), an all-reduce completes them, and then every rank projects its own fragments with no
    further communication, a cut row through its completed copy. Every rank holding a piece of a
    cut row computes the same coefficients from the same values, so the pieces stay consistent.
    The cut rows are exchanged in runs of weights whose rows fit in `exchange_block_bytes` (a larger
    weight's alone), each run just before its weights are projected, so a rank holds at most two runs' rows
    rather than every weight's: under ZeRO-3 each weight is cut world − 1 times, and those rows
    grow with the world (a 30B mixture of experts' are 7 GiB on 64 ranks) where the runs do not.
    """

    def __init__(
        self,
        constrained: list[ConstrainedParameter],
        communication_device: torch.device,
        stage12_boundaries: dict[str, list[int]] | None = None,
        shard_bases: bool = False,
        gather_block_bytes: int | None = None,
        exchange_block_bytes: int | None = None,
    ):
        """With `shard_bases` (ZeRO-3), each rank keeps its rows of every basis and the projections gather one
        basis whole (beyond `gather_block_bytes`, one column block) just before the weights that read it, the
        fragments taken grouped by basis, in the same order on every rank (`split_bases`). The cut rows are
        exchanged in runs of at most `exchange_block_bytes` (None: all at once)."""
        self.communication_device = communication_device
        self.shard_bases = shard_bases
        boundaries = stage12_boundaries or {}
        if shard_bases:
            constrained = grouped_by_basis(constrained)
        self.fragments = [MasterFragment(item, boundaries.get(item.name)) for item in constrained]
        if shard_bases:
            # After the fragments kept their anchor rows and moved to their masters; gathered on the device the
            # collectives use.
            split_bases([fragment.item for fragment in self.fragments], communication_device, None, gather_block_bytes)
        replicated = [fragment.item.name for fragment in self.fragments if fragment.replicated and not fragment.stage3]
        if replicated:
            raise NotImplementedError(
                f"nullspace_offload and nullspace_basis_storage='smaller' under ZeRO-1/2 need the projection inside "
                f"DeepSpeed's step ({replicated[0]} would exchange every row after it), which this DeepSpeed "
                "optimizer does not allow (a torch autocast GradScaler or ZenFlow steps it, or it is the BF16 "
                "optimizer of ZeRO-1 with fp32 gradient accumulation). Use ZeRO-3 or FSDP2 with them, turn those "
                "DeepSpeed options off, or turn them off."
            )
        self.exchange_runs = exchange_runs(self.fragments, exchange_block_bytes)
        self.exchanged_numel = sum(exchanged_numel(fragment) for fragment in self.fragments)
        self.whole_numel = sum(fragment.rows * fragment.row_length for fragment in self.fragments)

    def full_anchors(self) -> dict[str, torch.Tensor]:
        """The whole anchors from every rank's rows, for a checkpoint (a collective)."""
        return fragments_anchors(self.fragments, self.communication_device)

    def take_previous(self) -> None:
        """With complement bases (before training) or step snapshots (at the start of each DeepSpeed step):
        record every fragment's master values."""
        for fragment in self.fragments:
            fragment.take_previous()

    def summary(self) -> str:
        """What travels per step, for the log."""
        complements = sum(fragment.item.shared.complement for fragment in self.fragments)
        where = "host memory" if any(f.item.shared.offloaded for f in self.fragments) else "the accelerator"
        if self.shard_bases:
            distinct = distinct_bases(fragment.item for fragment in self.fragments)
            held = sum(shared.resident_bytes for shared in distinct) / 2**20
            whole = sum(shared.whole_bytes for shared in distinct) / 2**20
            where += (
                f", split over the ranks by rows ({held:.3f} of {whole:.3f} MiB kept here), each gathered while the "
                "weights that read it are projected"
            )
        return (
            f"ZeRO projection all-reduces {self.exchanged_numel} of {self.whole_numel} weight values per step "
            f"(the rows partitions split, in {len(self.exchange_runs)} runs); bases from {where}, {complements} of "
            f"{len(self.fragments)} as complements; {anchor_rows_kept(self.fragments)}"
        )

    def _in_projection_order(self) -> Iterator[MasterFragment]:
        """The fragments in order, each split basis whole (gathered: a collective every rank enters in the same
        order) while the fragments that read it are projected; gathered block by block inside `blocks()` where
        it is larger than a block. Without split bases, simply the fragments."""
        return with_bases_gathered(self.fragments)

    def _completed_rows(
        self, values_and_checks: Iterable[tuple[torch.Tensor, torch.Tensor]]
    ) -> Iterator[torch.Tensor]:
        """Every fragment's exchanged rows of the first of each pair, in the fragments' order, made
        whole by one all-reduce per exchange run, run when its first fragment's rows are asked for, so
        the pairs of a run are read just before its fragments are projected (last value of each buffer:
        the ranks where a pair's second holds NaN or inf, so that all ranks raise together)."""
        pairs = iter(values_and_checks)
        for run in self.exchange_runs:
            fragments = self.fragments[run]
            sizes = [exchanged_numel(fragment) for fragment in fragments]
            # The previous run's buffer lives on in the views the caller still holds: two runs at most.
            buffer = torch.zeros(sum(sizes) + 1, dtype=torch.float32, device=self.communication_device)
            rows, sums, offset = [], [], 0
            for fragment, size in zip(fragments, sizes, strict=True):
                values, check = next(pairs)  # read no further than this run
                block = buffer[offset : offset + size].view(-1, fragment.row_length)
                offset += size
                for piece in fragment.pieces:
                    slot = fragment.exchanged_slot(piece)
                    if slot is not None:
                        piece_values = values[piece.offset : piece.offset + piece.numel].view(piece.rows, -1)
                        block[slot : slot + piece.rows, piece.column_start : piece.column_end] = piece_values.to(
                            block.device
                        )
                sums.append(check.sum().to(self.communication_device))
                rows.append(block)
            all_reduce_or_raise_together(buffer, fragments, sums)
            yield from rows

    @torch.no_grad()
    def project_gradients(self, access: GradientAccess) -> torch.Tensor:
        """`G ← G − (G U) Uᵀ` (a complement: `G ← G N Nᵀ`) on this rank's fp32 gradient fragments,
        block by block, each run of cut rows exchanged whole just before its weights (each fragment read
        through `access` once for that, once to project it); returns the squared norm removed, summed over
        the ranks."""
        gradients = (access.read(fragment) for fragment in self.fragments)
        rows = self._completed_rows((gradient, gradient) for gradient in gradients)
        return projected_in_place(
            self._in_projection_order(),
            access,
            rows,
            MasterFragment.project_gradient_in_blocks,
            self.communication_device,
        )

    @torch.no_grad()
    def enforce_anchors(self) -> torch.Tensor:
        """`M ← M − (M U − A) Uᵀ` on the master weights (with a complement, `M ← P + (M − P) N Nᵀ`),
        block by block; returns the norm removed over this rank's rows (a device tensor, read only
        when the trainer logs). With a complement or step snapshots each weight's change is formed twice, for
        the exchange and for its projection, so that no more than one weight's is held at once."""
        masters = [fragment.master() for fragment in self.fragments]
        completed = self._completed_rows(
            (fragment.exchange_values(master), master)
            for fragment, master in zip(self.fragments, masters, strict=True)
        )
        squares = [torch.zeros((), dtype=torch.float32, device=self.communication_device)]
        for fragment, master, rows in zip(self._in_projection_order(), masters, completed, strict=True):
            change = fragment.exchange_values(master)
            rows = rows.to(master.device)
            if fragment.item.shared.complement:
                removed = fragment.enforce_with_complement(master, change, rows)
            else:
                removed = fragment.enforce_streamed(master, rows, change)
            if fragment.item.step_snapshots:
                fragment.previous = None  # the next step's snapshot is taken at its start
            squares.append(removed.to(self.communication_device))
        return torch.stack(squares).sum().sqrt()
