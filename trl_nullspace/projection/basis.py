"""The bases as the projections read them: one `SharedBasis` per distinct layer input, shared by every
weight that reads it, kept as the basis `U` or, where smaller, its orthonormal complement `N`.

Where its bytes live (with the weights, in host memory, split over the ranks, or nowhere on a rank that
never reads it) is its placement (`projection.placements`). The anchors, stored like their basis' blocks,
are `projection.anchors`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

from trl_nullspace.estimation.subspace import CapabilitySubspace
from trl_nullspace.projection.placements import (
    InHostMemory,
    OnDevice,
    Placement,
    Released,
    ShareHost,
    SplitOverRanks,
    host_copy,
)

CHECKSUM_CHUNK = 2**24  # values per step of `SharedBasis.bits_checksum` (two int64 copies: 256 MiB)


def orthonormal_complement(basis: torch.Tensor) -> torch.Tensor:
    """`N` (n×(n−k)), orthonormal, spanning what `U` (n×k) does not: the last columns of U's complete QR."""
    rank = basis.shape[1]
    return torch.linalg.qr(basis.double(), mode="complete").Q[:, rank:].float().contiguous()


class SharedBasis:
    """One distinct basis `U` (n×k) as the projections read it, shared by every weight whose input it
    spans (q/k/v share one, gate/up share one): one copy per device and dtype, not one per weight.

    With `complement`, the orthonormal complement `N` (n×(n−k)) is kept instead, where it is the
    smaller of the two (real layer inputs keep k of 70–90% of n at the default energy): the
    projections then use `I − U Uᵀ = N Nᵀ`, which needs no anchors but the weights' last projected
    values (`ConstrainedParameter`), and costs (n−k)/k of the FLOPs.

    Where it lives is its `placement`: with the weights (`OnDevice`); offloaded (`block_bytes` given) as
    column blocks in host memory that `blocks` stages one at a time (`InHostMemory`); split over the ranks
    by rows (`shard_rows`, `SplitOverRanks`), whole only inside `gathered()`; or freed on a rank that never
    reads it (`release`, `Released`). Block-wise projection is exact: U's columns are orthonormal, so
    removing `(M U_b − A_b) U_bᵀ` leaves `M U_c` unchanged for every other block `c`, and the blocks applied
    one after another equal the whole projection.

    A complement may be stored in bf16 (`stored_dtype`): half the bytes, read in fp32 when used (a
    transient copy, never kept). `N` is then not exactly orthonormal, but every projection through it,
    `change ← change N Nᵀ`, leaves the change inside span(N) exactly, so what it protects is exactly the
    rounded span's orthogonal complement, which the fp32 estimate differs from by a rotation of about
    2⁻⁹ (`make bench-precision`). `N Nᵀ` is not idempotent, so it is only ever applied to each step's
    change, never to accumulated weights (the complement path's invariant). A basis `U` stays fp32:
    `M − (M U − A) Uᵀ` needs an orthonormal `U` to be exact.
    """

    def __init__(
        self,
        basis: torch.Tensor,
        block_bytes: int | None = None,
        complement: bool = False,
        share_host: ShareHost | None = None,
        stored_dtype: torch.dtype = torch.float32,
    ):
        basis = basis.detach().to(torch.float32)
        self.dimension, self.rank = basis.shape  # `rank`: the protected directions, k, either way
        self.complement = complement
        if stored_dtype != torch.float32 and not complement:
            raise ValueError("Only a complement may be stored in low precision: a basis U must stay orthonormal.")
        self.stored_dtype = stored_dtype
        if complement:
            basis = orthonormal_complement(basis).to(device=basis.device, dtype=stored_dtype)
        self.stored_columns = basis.shape[1]
        self.placement: Placement = (
            OnDevice(basis) if block_bytes is None else InHostMemory(basis, block_bytes, share_host)
        )

    @property
    def offloaded(self) -> bool:
        return isinstance(self.placement, InHostMemory)

    @property
    def row_sharded(self) -> bool:
        return isinstance(self.placement, SplitOverRanks)

    @property
    def released(self) -> bool:
        return isinstance(self.placement, Released)

    @property
    def node_shared(self) -> bool:
        """Offloaded blocks read from one host copy per node (`node_memory`)."""
        return isinstance(self.placement, InHostMemory) and self.placement.node_shared

    @property
    def columns(self) -> list[slice]:
        """The column blocks a projection walks (one, unless offloaded or gathered block by block)."""
        return self.placement.columns

    @property
    def resident_bytes(self) -> int:
        """Bytes this basis holds between projections: its row shard, or its copies (offloaded: in host memory)."""
        return self.placement.resident_bytes

    @property
    def whole_bytes(self) -> int:
        """Bytes of the whole stored matrix, however it is held (split, offloaded or released)."""
        return self.dimension * self.stored_columns * self.stored_dtype.itemsize

    def _on_device(self, action: str) -> OnDevice:
        if not isinstance(self.placement, OnDevice):
            raise RuntimeError(f"Only a basis kept whole with the weights can be {action}.")
        return self.placement

    def bits_checksum(self) -> torch.Tensor:
        """An int64 checksum of the stored matrix's exact bits, computed where it lives (no host copy): the
        bits weighted by their position, so a changed or moved value changes it. Exact integer arithmetic,
        so equal bytes give equal checksums on every device."""
        stored = self._on_device("checksummed").stored
        bits = stored.contiguous().reshape(-1).view(torch.int16 if stored.element_size() == 2 else torch.int32)
        total = torch.zeros((), dtype=torch.int64, device=bits.device)
        for start in range(0, bits.numel(), CHECKSUM_CHUNK):  # int64 copies of one chunk at a time
            piece = bits[start : start + CHECKSUM_CHUNK].to(torch.int64)
            weights = torch.arange(start, start + piece.numel(), device=bits.device, dtype=torch.int64) % 65521 + 1
            total += (piece * weights).sum()
        return total

    def shard_rows(self, group: dist.ProcessGroup | None = None, block_bytes: int | None = None) -> None:
        """Keep only this rank's rows of the stored matrix, freeing the whole copies (`SplitOverRanks`);
        gathered whole for each projection, or block by block where larger than `block_bytes`. Every rank
        of `group` must shard the same bases."""
        if self.row_sharded:
            return
        if self.offloaded:
            raise RuntimeError("An offloaded basis lives in host memory; it is not also split over the ranks.")
        self.placement = SplitOverRanks(self._on_device("split").stored, group, block_bytes)

    def release(self) -> None:
        """Free this rank's copies of a basis that none of the rows it projects reads (ZeRO-1/2: a rank's
        contiguous partition reaches only some layers' weights). Exact: what this rank projects never
        reads it; any read afterwards raises instead of projecting without it. An offloaded or split basis
        stays (host blocks may be shared by the node's processes; split rows take part in gathers)."""
        if isinstance(self.placement, OnDevice):
            self.placement = Released(self.placement.columns)

    def gathered(self) -> contextlib.AbstractContextManager[None]:
        """Within this block the basis is whole (`whole`, `blocks`): for a split basis one all-gather, a
        collective every rank enters for the same bases in the same order; otherwise a no-op."""
        return self.placement.gathered()

    def whole(self, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All of `U` (or `N`) on `device` in `dtype`; made once and shared by every weight that uses it."""
        return self.placement.whole(device, dtype)

    def move(self, device: torch.device) -> None:
        """Keep the copies on `device` only (the weights are now stepped there), freeing the others."""
        self.placement.move(device)

    def blocks(self, device: torch.device, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        """`U`'s column blocks on `device`, in the order of `columns`: the whole basis as one block, or,
        offloaded or split by block, each block staged or gathered when it is reached (and freed after)."""
        return self.placement.blocks(device, dtype)

    def take_part_in_gathers(self) -> None:
        """Enter the collectives `blocks()` makes, without using what they gather: a rank with none of a
        weight's rows to project must still take part when its split basis is gathered block by block by
        each weight that reads it, or the other ranks would wait for it."""
        self.placement.take_part_in_gathers()

    def split(self, coefficients: torch.Tensor) -> list[torch.Tensor]:
        """Coefficients on `U` (rows×k, e.g. an anchor) cut into the blocks' columns, stored where the
        blocks are: host memory if offloaded, else where `coefficients` is."""
        if len(self.columns) == 1 and not self.offloaded:
            return [coefficients]
        keep = host_copy if self.offloaded else torch.Tensor.clone
        return [keep(coefficients[:, columns]) for columns in self.columns]


class SharedBases:
    """The subspace's bases as `SharedBasis` objects: one per basis key, however many weights read it."""

    def __init__(
        self,
        subspace: CapabilitySubspace,
        offload_block_bytes: int | None,
        smaller: bool = False,
        device: torch.device | None = None,
        share_host: ShareHost | None = None,
        complement_dtype: torch.dtype = torch.float32,
    ):
        self.subspace = subspace
        self.complement_dtype = complement_dtype  # what a complement is stored in (`SharedBasis`)
        self.offload_block_bytes = offload_block_bytes
        self.share_host = share_host
        self.smaller = smaller  # keep the complement where it is smaller than the basis
        self.device = device  # where a complement is computed (a complete QR: the accelerator's job)
        self._shared: dict[str, SharedBasis] = {}

    def for_target(self, target: str) -> SharedBasis:
        key = self.subspace.targets[target]
        if key not in self._shared:
            basis = self.subspace.bases[key]
            dimension, rank = basis.shape
            complement = self.smaller and dimension - rank < rank
            if complement and self.device is not None:
                basis = basis.to(self.device)
            dtype = self.complement_dtype if complement else torch.float32
            self._shared[key] = SharedBasis(basis, self.offload_block_bytes, complement, self.share_host, dtype)
        return self._shared[key]
