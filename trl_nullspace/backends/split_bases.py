"""Bases split over the ranks by rows (`nullspace_shard_bases`): the set-up FSDP2 and ZeRO-3 share.

Each rank keeps `ceil(d / world)` rows of every basis (`SharedBasis.shard_rows`) and the projections
gather one whole (or, beyond the block size, one column block) just before the weights that read it.
A split basis is the rows of every rank's copy put together, so the copies must agree bit for bit
before they are cut: each rank computes complements itself (a QR on its own device), so they can
differ, and a checksum of each basis' exact bits is compared across the ranks first.

The gathers are collectives, so every rank must reach the bases in the same order: the sharded
projectors take their weights grouped by basis (`grouped_by_basis`) and walk them with each basis
whole while its weights are projected (`with_bases_gathered`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Protocol, TypeVar

import torch
import torch.distributed as dist

from trl_nullspace.backends.agreement import items_differing_between_ranks
from trl_nullspace.projection.basis import SharedBasis
from trl_nullspace.projection.constrained import ConstrainedParameter


class _ProjectsAWeight(Protocol):
    item: ConstrainedParameter


Holder = TypeVar("Holder", bound=_ProjectsAWeight)


def distinct_bases(constrained: Iterable[ConstrainedParameter]) -> list[SharedBasis]:
    """Each basis the weights read, once (q/k/v share one), in the order they first appear."""
    return list({id(item.shared): item.shared for item in constrained}.values())


def grouped_by_basis(constrained: Iterable[ConstrainedParameter]) -> list[ConstrainedParameter]:
    """The weights with those reading one basis next to each other, the bases in the order they first appear:
    the same on every rank, which binds the same weights in the same order."""
    by_basis: dict[int, list[ConstrainedParameter]] = {}
    for item in constrained:
        by_basis.setdefault(id(item.shared), []).append(item)
    return [item for items in by_basis.values() for item in items]


def with_bases_gathered(holders: Iterable[Holder]) -> Iterator[Holder]:
    """`holders` in order, each run of them reading one basis inside that basis' `gathered()` (whole, a
    collective, if split; a no-op otherwise). A basis gathered block by block is gathered inside `blocks()`."""
    for _, run in itertools.groupby(holders, key=lambda holder: id(holder.item.shared)):
        run = list(run)
        with run[0].item.shared.gathered():
            yield from run


def split_bases(
    constrained: list[ConstrainedParameter],
    device: torch.device,
    group: dist.ProcessGroup | None,
    block_bytes: int | None,
) -> None:
    """Split every distinct basis of `constrained` over the ranks of `group`, one at a time: each is moved to
    `device` (where the gathers run) whole, checksummed and cut to this rank's rows before the next one moves,
    so the set-up never holds more than one basis whole there. A basis larger than `block_bytes` is gathered
    block by block later (`SharedBasis.shard_rows`), and its weights' anchors are cut into the same column
    blocks (whole anchors, or the rows a rank already kept)."""
    checksums = []
    for shared in distinct_bases(constrained):
        shared.move(device)
        checksums.append(shared.bits_checksum())
        shared.shard_rows(group, block_bytes)
    check_same_bytes_on_every_rank(torch.stack(checksums), group)
    for item in constrained:
        if item.anchor_state is not None and len(item.anchor_state.blocks) != len(item.shared.columns):
            item.anchor_state = item.anchor_state.recut(item.shared.columns)


def check_same_bytes_on_every_rank(checksums: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    """Refuse bases that differ between the ranks once split (`checksums`: one per basis, `bits_checksum`).
    Each rank computes its complements itself (a QR on its own device), and a split basis is the rows of
    every rank's copy put together: copies that differ in any bit would make a matrix no rank estimated."""
    differing = items_differing_between_ranks(checksums, group)
    if differing:
        raise RuntimeError(
            f"The ranks hold different bytes for {len(differing)} of {len(checksums)} bases (e.g. number "
            f"{differing[0]}), so splitting them would join rows of different matrices. Load one subspace cache "
            "on every rank (nullspace_cache_path) and keep the ranks' devices and torch versions alike, or turn "
            "nullspace_shard_bases off."
        )
