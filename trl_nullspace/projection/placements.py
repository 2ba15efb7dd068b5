"""Where one stored basis (or complement) keeps its bytes between projections, and how a projection reads
them: on the device (`OnDevice`), in host memory as column blocks (`InHostMemory`), split over the ranks
by rows (`SplitOverRanks`), or nowhere on a rank that never reads it (`Released`).

Each placement offers the same reads (`whole`, `blocks`, `gathered`), so `SharedBasis` and the projections
never ask which one they have. Invariant: every placement yields the exact stored bytes, in the same column
blocks on every rank, so a projection is bit for bit the same wherever the basis lives (blocks are exact
because the stored columns are orthonormal). A placement changes only one way, from `OnDevice`:
`SharedBasis.shard_rows` splits it, `SharedBasis.release` frees it.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

FP32_BYTES = 4
# Host copies of a basis' blocks, and whether the node's processes share them (`node_memory.share_on_node`).
ShareHost = Callable[[list[torch.Tensor]], tuple[list[torch.Tensor], bool]]


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of `tensor` in host memory (never a view of it), page-locked where an accelerator can
    read it asynchronously."""
    copy = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=torch.cuda.is_available())
    return copy.copy_(tensor.detach())


def column_blocks(columns: int, width: int) -> list[slice]:
    """`columns` cut into blocks of `width`; one empty block where there are none (an expert no reference
    token reached keeps rank 0), so every basis has at least one block to walk."""
    return [slice(start, min(start + width, columns)) for start in range(0, columns, width)] or [slice(0, 0)]


class Placement(ABC):
    """Where one stored matrix (n × stored columns) lives between projections (module docstring)."""

    columns: list[slice]  # the column blocks a projection walks, in order

    @property
    @abstractmethod
    def resident_bytes(self) -> int:
        """Bytes held between projections (in host memory where offloaded)."""

    @abstractmethod
    def whole(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The whole stored matrix on `device` in `dtype`, where this placement can give it."""

    def blocks(self, device: torch.device, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        """The matrix's column blocks on `device`, in the order of `columns`."""
        yield self.whole(device, dtype)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Within this block `whole` can be read; only a split placement has work to do."""
        yield

    def take_part_in_gathers(self) -> None:
        """Enter the collectives `blocks()` would make, using nothing (only split placements make any)."""
        return None

    def move(self, device: torch.device) -> None:
        """Keep the bytes on `device` (the weights are now stepped there), where they live on a device."""
        return None


class OnDevice(Placement):
    """The whole matrix with the weights, one copy per device and dtype, made once and shared by every weight
    that reads it. A low-precision matrix read in fp32 gives a transient copy, never kept."""

    def __init__(self, matrix: torch.Tensor):
        self.stored = matrix  # the matrix as stored: its exact bytes
        self.columns = [slice(0, matrix.shape[1])]
        # The stored matrix on other devices or in other dtypes, each made once (never a low-precision one in fp32).
        self._copies: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def resident_bytes(self) -> int:
        held = [self.stored, *self._copies.values()]
        return sum(tensor.numel() * tensor.element_size() for tensor in held)

    def whole(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (torch.device(device), dtype)
        if key == (self.stored.device, self.stored.dtype):
            return self.stored
        if key not in self._copies:
            copy = self.stored.to(device=device, dtype=dtype)
            if self.stored.dtype != torch.float32 and dtype != self.stored.dtype:
                return copy  # read in fp32 when used, never kept so
            self._copies[key] = copy
        return self._copies[key]

    def move(self, device: torch.device) -> None:
        self.stored = self.stored.to(device)
        dtypes = {dtype for _, dtype in self._copies} - {self.stored.dtype}
        self._copies = {(torch.device(device), dtype): self.stored.to(dtype) for dtype in dtypes}


class InHostMemory(Placement):
    """Contiguous column blocks of at most `block_bytes` in host memory (`nullspace_offload`), each copied to
    the accelerator when a projection reaches it and freed after; optionally one copy per node, in shared
    memory (`node_shared`, `backends.node_memory`)."""

    def __init__(self, matrix: torch.Tensor, block_bytes: int, share_host: ShareHost | None = None):
        width = max(1, block_bytes // (FP32_BYTES * max(matrix.shape[0], 1)))
        self.columns = column_blocks(matrix.shape[1], width)
        blocks = [matrix[:, columns] for columns in self.columns]
        self.node_shared = False
        if share_host is None:
            self.host_blocks = [host_copy(block) for block in blocks]
        else:
            self.host_blocks, self.node_shared = share_host(blocks)

    @property
    def resident_bytes(self) -> int:
        return sum(block.numel() * block.element_size() for block in self.host_blocks)

    def whole(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if torch.device(device).type != "cpu":
            raise RuntimeError("An offloaded basis is staged block by block; it is never whole on the accelerator.")
        return torch.cat(self.host_blocks, dim=1).to(dtype)

    def blocks(self, device: torch.device, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        for block in self.host_blocks:
            yield block.to(device=device, dtype=dtype, non_blocking=True)


class SplitOverRanks(Placement):
    """Each rank's `ceil(n / world)` rows of the matrix (zero-padded on the last ranks, so every shard has one
    shape); the whole matrix exists only inside `gathered()`, one all-gather of the exact stored bytes. A
    matrix larger than `block_bytes` is instead gathered one column block at a time by `blocks()`, by each
    weight that reads it, so no more than a block is ever whole. Resident: 1/world of it; in flight: it whole,
    or one block; traffic: (world − 1)/world of it received at every gather."""

    def __init__(
        self, whole: torch.Tensor, group: dist.ProcessGroup | None = None, block_bytes: int | None = None
    ) -> None:
        self.dimension, stored_columns = whole.shape
        self.group = group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        chunk = -(-self.dimension // world)
        self.shard = whole.new_zeros(chunk, stored_columns)
        rows = whole[rank * chunk : (rank + 1) * chunk]
        self.shard[: rows.shape[0]] = rows
        width = stored_columns
        if block_bytes is not None:
            width = max(1, block_bytes // (whole.element_size() * chunk * world))
        self.by_block = width < stored_columns
        self.columns = column_blocks(stored_columns, width) if self.by_block else [slice(0, stored_columns)]
        self._gathered: OnDevice | None = None

    @property
    def resident_bytes(self) -> int:
        return self.shard.numel() * self.shard.element_size()

    def _gather(self, columns: slice) -> torch.Tensor:
        """The matrix's `columns`, all rows, from every rank's shard: one all-gather into one buffer."""
        world = dist.get_world_size(self.group)
        piece = self.shard[:, columns].contiguous()
        whole = piece.new_empty(world * piece.shape[0], piece.shape[1])
        dist.all_gather_single(whole, piece, group=self.group)
        return whole[: self.dimension]

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """The matrix whole on the shard's device within this block: a collective every rank enters for the same
        bases in the same order (a no-op where `blocks()` gathers block by block)."""
        if self.by_block:
            yield
            return
        self._gathered = OnDevice(self._gather(self.columns[0]))
        try:
            yield
        finally:
            self._gathered = None

    def whole(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if self._gathered is None:
            where = "through `blocks()`, block by block" if self.by_block else "inside `gathered()`"
            raise RuntimeError(f"This basis is split over the ranks: read it {where}.")
        return self._gathered.whole(device, dtype)

    def blocks(self, device: torch.device, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        if not self.by_block:
            yield self.whole(device, dtype)
            return
        for columns in self.columns:  # a collective per block: every rank's weights ask in the same order
            yield self._gather(columns).to(device=device, dtype=dtype)

    def take_part_in_gathers(self) -> None:
        if self.by_block:
            for columns in self.columns:
                self._gather(columns)

    def move(self, device: torch.device) -> None:
        self.shard = self.shard.to(device)


class Released(Placement):
    """Nothing: no weight row this rank projects reads the matrix (a ZeRO-1/2 rank's contiguous partition
    reaches only some layers' weights). Any read raises instead of projecting without it."""

    def __init__(self, columns: list[slice]):
        self.columns = columns

    @property
    def resident_bytes(self) -> int:
        return 0

    def whole(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        raise RuntimeError(
            "This basis was released on this rank: none of the weight rows its DeepSpeed ZeRO-1/2 partition "
            "holds reads it (`SharedBasis.release`), so projecting with it here is a bug; please report it."
        )
