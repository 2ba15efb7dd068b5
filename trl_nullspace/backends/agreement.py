"""Whether every rank holds the same bytes: one all-gather of per-item checksums.

Each rank projects with its own copy of the bases (loaded, estimated or, for complements, computed on
its own device), and sharded or replicated training is only exact if those copies agree bit for bit.
A rank that found a disagreement and raised alone would leave the others waiting in their next
collective, so every rank gathers every rank's checksums and all of them see the same answer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def items_differing_between_ranks(checksums: torch.Tensor, group: dist.ProcessGroup | None = None) -> list[int]:
    """The indices of `checksums` (one int64 per checked item, on the device the collective uses) where some
    rank of `group` holds another value: the same list on every rank."""
    gathered = [torch.empty_like(checksums) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, checksums, group=group)
    return [index for index in range(len(checksums)) if any(bool(g[index] != checksums[index]) for g in gathered)]
