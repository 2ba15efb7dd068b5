"""The anchors `A = M₀ U` (or, with a complement basis, the weights as last projected) of the
constrained weights, cut like their basis' column blocks and stored where the basis is.

Sharded backends keep only the anchor rows their rank projects (`Anchor.keep_rows`) and gather them
whole for checkpoints (`gather_anchors`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from trl_nullspace.projection.placements import host_copy


class Anchor:
    """`A = M₀ U` of one weight (d_out×k), cut like its basis' column blocks and stored where the
    basis is; a sharded backend keeps only rows `[first_row, first_row + rows)`, those its rank
    projects, so the anchors are split over the ranks instead of whole on each. With a complement
    basis the same holds the weights as last projected instead (one block, d_out×d_in)."""

    def __init__(self, blocks: list[torch.Tensor], offloaded: bool, first_row: int = 0, total_rows: int | None = None):
        self.blocks = blocks
        self.offloaded = offloaded
        self.first_row = first_row
        self.total_rows = blocks[0].shape[0] if total_rows is None else total_rows
        # Set on every rank of a sharded backend, whatever rows it holds.
        self.sharded = first_row != 0 or blocks[0].shape[0] != self.total_rows

    @property
    def complete(self) -> bool:
        return not self.sharded

    def keep_rows(self, first: int, count: int) -> None:
        """Keep rows `[first, first + count)` only (of the whole anchor), freeing the others."""
        if not self.complete:
            raise RuntimeError("An anchor already trimmed to a shard's rows cannot be trimmed again.")
        keep = host_copy if self.offloaded else torch.Tensor.clone
        self.blocks = [keep(block[first : first + count]) for block in self.blocks]
        self.first_row = first
        self.sharded = True

    def recut(self, columns: list[slice]) -> Anchor:
        """The same rows cut into other column blocks (its basis was split over the ranks and is now
        gathered block by block: `SharedBasis.shard_rows`)."""
        held = self.held()
        keep = host_copy if self.offloaded else torch.Tensor.contiguous
        return Anchor([keep(held[:, block]) for block in columns], self.offloaded, self.first_row, self.total_rows)

    def block(self, index: int, rows: slice | None = None) -> torch.Tensor:
        """Column block `index`, for all rows or for the weight's rows `rows` (which this anchor holds)."""
        block = self.blocks[index]
        if rows is None:
            if not self.complete:
                raise RuntimeError("This anchor holds one shard's rows only; ask for the rows.")
            return block
        start, stop = rows.start - self.first_row, rows.stop - self.first_row
        if start < 0 or stop > block.shape[0]:
            raise RuntimeError(f"Anchor rows {rows.start}–{rows.stop} are not among the rows this rank holds.")
        return block[start:stop]

    def rows(self, first: int, count: int) -> torch.Tensor:
        """Rows `[first, first + count)` of the whole anchor, all columns."""
        blocks = [self.block(index, slice(first, first + count)) for index in range(len(self.blocks))]
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)

    def held(self) -> torch.Tensor:
        """The rows this anchor holds, all columns (`first_row` says where they start)."""
        return self.rows(self.first_row, self.blocks[0].shape[0])

    def move(self, device: torch.device) -> None:
        if not self.offloaded:
            self.blocks = [block.to(device) for block in self.blocks]


def gather_anchors(anchors: dict[str, Anchor], device: torch.device) -> dict[str, torch.Tensor]:
    """The whole anchors, on the CPU of every rank, from the rows each rank holds (a collective:
    every rank passes the same names in the same order). For checkpoints, which store them whole."""
    whole = {}
    world = dist.get_world_size()
    for name, anchor in anchors.items():
        if not anchor.sharded:
            whole[name] = anchor.held().cpu()
            continue
        held = anchor.held().to(device)
        extent = torch.tensor([anchor.first_row, held.shape[0]], device=device)
        extents = [torch.empty_like(extent) for _ in range(world)]
        dist.all_gather(extents, extent)
        longest = max(int(rows) for _, rows in extents)
        padded = torch.zeros(longest, held.shape[1], dtype=held.dtype, device=device)
        padded[: held.shape[0]] = held
        pieces = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(pieces, padded)
        result = torch.full((anchor.total_rows, held.shape[1]), float("nan"))
        for (first, rows), piece in zip(extents, pieces, strict=True):
            result[int(first) : int(first) + int(rows)] = piece[: int(rows)].cpu()
        if not torch.isfinite(result).all():
            raise RuntimeError(f"The ranks' anchor rows of {name} do not cover all its rows.")
        whole[name] = result
    return whole
