"""Where the bases live: whole with the weights, offloaded, split over the ranks, or nowhere on a rank
that never reads them.

Every weight that reads one input shares that input's basis (`SharedBasis`), one copy per device,
or its orthonormal complement where that is smaller. Offloaded, bases stay in host memory as column
blocks that the projections stage to the accelerator one at a time. Row-sharded
(`SharedBasis.shard_rows`), each rank keeps 1/world of every basis' rows and the projections gather
one basis whole at a time (`SharedBasis.gathered`), or a large one block by block. Released
(`SharedBasis.release`), a rank holds none of a basis none of its rows reads (ZeRO-1/2). The anchors,
stored like their basis' blocks, are `projection.anchors`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from trl_nullspace.estimation.subspace import CapabilitySubspace

FP32_BYTES = 4
CHECKSUM_CHUNK = 2**24  # values per step of `SharedBasis.bits_checksum` (two int64 copies: 256 MiB)
# Host copies of a basis' blocks, and whether the node's processes share them (`node_memory.share_on_node`).
ShareHost = Callable[[list[torch.Tensor]], tuple[list[torch.Tensor], bool]]


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of `tensor` in host memory (never a view of it), page-locked where an accelerator can
    read it asynchronously."""
    copy = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=torch.cuda.is_available())
    return copy.copy_(tensor.detach())


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

    Offloaded (`block_bytes` given), `U` stays in host memory as contiguous column blocks of at most
    `block_bytes`, and `blocks` stages them to the accelerator one at a time. Block-wise projection
    is exact: U's columns are orthonormal, so removing `(M U_b − A_b) U_bᵀ` leaves `M U_c` unchanged
    for every other block `c`, and the blocks applied one after another equal the whole projection.

    Row-sharded (`shard_rows`), each rank keeps `ceil(n / world)` of the stored matrix's rows and the
    whole matrix exists only inside `gathered()`: one all-gather of the exact stored bytes, so every
    projection is bit for bit the unsharded one. Resident: 1/world of the basis; in flight: one
    basis whole; traffic: the basis, (world − 1)/world of it received, at every `gathered()`.

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
        self.offloaded = block_bytes is not None
        self._copies: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._row_shard: torch.Tensor | None = None  # this rank's rows, padded to `ceil(n / world)`
        self._group: dist.ProcessGroup | None = None
        self._gathered_by_block = False  # split and larger than a block: `blocks()` gathers each block
        self._host_blocks: list[torch.Tensor] = []
        self.node_shared = False  # offloaded blocks read from one host copy per node (`node_memory`)
        self.released = False  # no weight this rank projects reads it (`release`)
        if self.offloaded:
            width = max(1, block_bytes // (FP32_BYTES * max(self.dimension, 1)))
            # At least one block, empty for an expert no reference token reached (rank 0).
            stored = self.stored_columns
            self.columns = [slice(start, min(start + width, stored)) for start in range(0, stored, width)] or [
                slice(0, 0)
            ]
            blocks = [basis[:, columns] for columns in self.columns]
            if share_host is None:
                self._host_blocks = [host_copy(block) for block in blocks]
            else:
                self._host_blocks, self.node_shared = share_host(blocks)
        else:
            self.columns = [slice(0, self.stored_columns)]
            self._copies[(basis.device, stored_dtype)] = basis

    @property
    def row_sharded(self) -> bool:
        return self._row_shard is not None

    @property
    def resident_bytes(self) -> int:
        """Bytes this basis holds between projections: its row shard, or its device copies (offloaded: host)."""
        if self._row_shard is not None:
            return self._row_shard.numel() * self._row_shard.element_size()
        held = self._host_blocks if self.offloaded else self._copies.values()
        return sum(tensor.numel() * tensor.element_size() for tensor in held)

    @property
    def whole_bytes(self) -> int:
        """Bytes of the whole stored matrix, however it is held (split, offloaded or released)."""
        return self.dimension * self.stored_columns * self.stored_dtype.itemsize

    def bits_checksum(self) -> torch.Tensor:
        """An int64 checksum of the stored matrix's exact bits, computed where it lives (no host copy): the
        bits weighted by their position, so a changed or moved value changes it. Exact integer arithmetic,
        so equal bytes give equal checksums on every device."""
        stored = next(tensor for (_, dtype), tensor in self._copies.items() if dtype == self.stored_dtype)
        bits = stored.contiguous().reshape(-1).view(torch.int16 if stored.element_size() == 2 else torch.int32)
        total = torch.zeros((), dtype=torch.int64, device=bits.device)
        for start in range(0, bits.numel(), CHECKSUM_CHUNK):  # int64 copies of one chunk at a time
            piece = bits[start : start + CHECKSUM_CHUNK].to(torch.int64)
            weights = torch.arange(start, start + piece.numel(), device=bits.device, dtype=torch.int64) % 65521 + 1
            total += (piece * weights).sum()
        return total

    def shard_rows(self, group: dist.ProcessGroup | None = None, block_bytes: int | None = None) -> None:
        """Keep only this rank's rows of the stored matrix (`ceil(n / world)` of them, zero-padded on the
        last ranks so that every shard has one shape), freeing the whole copies; `gathered()` then
        rebuilds it for each projection. A matrix larger than `block_bytes` is instead gathered one column
        block at a time by `blocks()`, by each weight that reads it, so no more than a block is ever whole
        (exact: the blocks' columns are orthonormal). Every rank of `group` must shard the same bases."""
        if self.offloaded:
            raise RuntimeError("An offloaded basis lives in host memory; it is not also split over the ranks.")
        if self.row_sharded:
            return
        whole = next(tensor for (_, dtype), tensor in self._copies.items() if dtype == self.stored_dtype)
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        chunk = -(-self.dimension // world)
        shard = whole.new_zeros(chunk, self.stored_columns)
        rows = whole[rank * chunk : (rank + 1) * chunk]
        shard[: rows.shape[0]] = rows
        self._row_shard, self._group = shard, group
        self._copies = {}
        width = (
            self.stored_columns
            if block_bytes is None
            else max(1, block_bytes // (whole.element_size() * chunk * world))
        )
        if width < self.stored_columns:
            self.columns = [
                slice(start, min(start + width, self.stored_columns)) for start in range(0, self.stored_columns, width)
            ]
            self._gathered_by_block = True

    def release(self) -> None:
        """Free this rank's copies of a basis that none of the rows it projects reads (ZeRO-1/2: a rank's
        contiguous partition reaches only some layers' weights). Exact: what this rank projects never
        reads it; any read afterwards raises instead of projecting without it. An offloaded basis stays
        (its host blocks may be shared by the node's processes)."""
        if self.offloaded or self._row_shard is not None:
            return
        self._copies = {}
        self.released = True

    def _gather(self, columns: slice) -> torch.Tensor:
        """The stored matrix's `columns`, all rows, from every rank's shard: one all-gather into one buffer."""
        world = dist.get_world_size(self._group)
        piece = self._row_shard[:, columns].contiguous()
        whole = piece.new_empty(world * piece.shape[0], piece.shape[1])
        dist.all_gather_single(whole, piece, group=self._group)
        return whole[: self.dimension]

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Within this block the basis is whole (`whole`, `blocks`) on the device of its row shard: one
        all-gather, a collective every rank enters for the same bases in the same order. A no-op for a
        basis that is not row-sharded, or that `blocks()` gathers block by block."""
        if self._row_shard is None or self._gathered_by_block:
            yield
            return
        self._copies = {(self._row_shard.device, self.stored_dtype): self._gather(slice(0, self.stored_columns))}
        try:
            yield
        finally:
            self._copies = {}

    def whole(self, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All of `U` (or `N`) on `device` in `dtype`; made once and shared by every weight that uses it."""
        if self.offloaded:
            if torch.device(device).type != "cpu":
                raise RuntimeError(
                    "An offloaded basis is staged block by block; it is never whole on the accelerator."
                )
            return torch.cat(self._host_blocks, dim=1).to(dtype)
        if self.released:
            raise RuntimeError(
                "This basis was released on this rank: none of the weight rows its DeepSpeed ZeRO-1/2 partition "
                "holds reads it (`SharedBasis.release`), so projecting with it here is a bug; please report it."
            )
        if not self._copies:
            where = "through `blocks()`, block by block" if self._gathered_by_block else "inside `gathered()`"
            raise RuntimeError(f"This basis is split over the ranks: read it {where}.")
        key = (torch.device(device), dtype)
        if key not in self._copies:
            source = next(iter(self._copies.values()))
            if self.stored_dtype != torch.float32 and dtype != self.stored_dtype:
                return source.to(device=device, dtype=dtype)  # read in fp32 when used, never kept so
            self._copies[key] = source.to(device=device, dtype=dtype)
        return self._copies[key]

    def move(self, device: torch.device) -> None:
        """Keep the copies on `device` only (the weights are now stepped there), freeing the others."""
        if self.offloaded or self.released:
            return
        if self._row_shard is not None:
            self._row_shard = self._row_shard.to(device)
            return
        dtypes = {dtype for _, dtype in self._copies}
        source = next(iter(self._copies.values()))
        self._copies = {(torch.device(device), dtype): source.to(device=device, dtype=dtype) for dtype in dtypes}

    def blocks(self, device: torch.device, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        """`U`'s column blocks on `device`, in the order of `columns`: the whole basis as one block,
        or, offloaded, each block copied from host memory when it is reached (and freed after)."""
        if self._gathered_by_block:
            for columns in self.columns:  # a collective per block: every rank's weights ask in the same order
                yield self._gather(columns).to(device=device, dtype=dtype)
            return
        if not self.offloaded:
            yield self.whole(device, dtype)
            return
        for block in self._host_blocks:
            yield block.to(device=device, dtype=dtype, non_blocking=True)

    def take_part_in_gathers(self) -> None:
        """Enter the collectives `blocks()` makes, without using what they gather: a rank with none of a
        weight's rows to project must still take part when its split basis is gathered block by block by
        each weight that reads it, or the other ranks would wait for it."""
        if self._gathered_by_block:
            for columns in self.columns:
                self._gather(columns)

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
