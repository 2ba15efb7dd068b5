"""One host copy of the offloaded bases per node, shared by the node's processes.

Offloaded bases (`nullspace_offload`) are the same on every process, and each process used to keep
its own host copy: at 70B on 8 GPUs that is 248 GiB of bases per process, 2 TB per node. Here the
node's first process writes them once into a file in `/dev/shm` (memory, not disk), every process
of the node maps that file, and the file's name is removed once all have mapped it, so the memory is freed
when the last process exits. Where an accelerator reads the blocks, each process page-locks its
mapping (`cudaHostRegister`) so the copies stay asynchronous, as with a private pinned copy.

Every step is a collective: a failure on one process (no room in `/dev/shm`, a failed page-lock)
is raised on all of them, with the fix, instead of leaving the others waiting.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import uuid
import weakref
from collections.abc import Callable

import torch
import torch.distributed as dist

from trl_nullspace.projection.placements import host_copy

SHARED_MEMORY = "/dev/shm"
FIX = "set nullspace_offload_share_node: false to keep one copy per process"


def node_identity() -> str:
    """What tells this machine (and container) from others: its host name and kernel boot id."""
    boot_id = ""
    with contextlib.suppress(OSError):
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot_id = handle.read().strip()
    return f"{socket.gethostname()}/{boot_id}"


def share_on_node(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
    """Host copies of `tensors` (fp32, the same on every process; each process must call this),
    read by every process of a node from one shared mapping. Returns the copies and whether they
    are shared (False, and private page-locked copies, where a process is alone on its node).

    The node's processes are found from `node_identity`, whatever the launcher. Every process but
    the writer checks that the mapping holds its own tensors, so processes wrongly taken for one node's
    (machines with one name, containers with their own `/dev/shm`) fail instead of reading zeros.
    """
    if not dist.is_initialized():
        return [host_copy(tensor) for tensor in tensors], False
    node = _node_ranks(dist.get_world_size(), dist.get_rank())
    if len(node) == 1:
        return [host_copy(tensor) for tensor in tensors], False
    leader = dist.get_rank() == node[0]
    total = max(1, sum(tensor.numel() for tensor in tensors))
    token = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    path = os.path.join(SHARED_MEMORY, f"trl-nullspace-bases-{token[0]}")
    flat: torch.Tensor | None = None

    def write() -> None:
        nonlocal flat
        if not leader:
            return
        _check_room(total * 4)
        flat = torch.from_file(path, shared=True, size=total, dtype=torch.float32)
        for view, tensor in zip(_views(flat, tensors), tensors, strict=True):
            view.copy_(tensor.detach())

    def read() -> None:
        nonlocal flat
        if not leader:
            if not os.path.exists(path):
                raise RuntimeError(
                    f"{path} is not here: this process shares a host name and boot id with the node's first process "
                    f"but not its {SHARED_MEMORY} (another container?); {FIX}"
                )
            flat = torch.from_file(path, shared=True, size=total, dtype=torch.float32)
            _check_holds(flat, tensors, path)
        if torch.cuda.is_available():
            _page_lock(flat)

    def release_name() -> None:
        if leader:
            os.unlink(path)

    try:
        for step in (write, read, release_name):
            _together(step)
    finally:  # never leave the name behind, even when a step failed
        if leader and os.path.exists(path):
            os.unlink(path)
    return _views(flat, tensors), True


@functools.cache
def _node_ranks(world: int, rank: int) -> tuple[int, ...]:
    """The ranks on this process' node (a collective, run once per process: every basis asks)."""
    identities: list[str | None] = [None] * world
    dist.all_gather_object(identities, node_identity())
    return tuple(other for other, identity in enumerate(identities) if identity == identities[rank])


def _views(flat: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """`tensors`' places in the flat mapping, one after another, each in its own shape."""
    views, offset = [], 0
    for tensor in tensors:
        views.append(flat[offset : offset + tensor.numel()].view(tensor.shape))
        offset += tensor.numel()
    return views


def _check_holds(flat: torch.Tensor, tensors: list[torch.Tensor], path: str) -> None:
    """A reader's mapping must hold its own bases (the first process wrote its own there)."""
    for view, tensor in zip(_views(flat, tensors), tensors, strict=True):
        if not torch.equal(view, tensor.detach().to(flat.device)):
            raise RuntimeError(f"The shared copy of the bases in {path} differs from this process' bases; {FIX}")


def _check_room(size: int) -> None:
    if not os.path.isdir(SHARED_MEMORY):
        raise RuntimeError(f"No {SHARED_MEMORY} on this machine to share the offloaded bases in; {FIX}.")
    stat = os.statvfs(SHARED_MEMORY)
    free = stat.f_bavail * stat.f_frsize
    if free < size:
        raise RuntimeError(
            f"{SHARED_MEMORY} has {free / 2**30:.2f} GiB free; the offloaded bases need {size / 2**30:.2f} GiB. "
            f"Give it more (Docker: --shm-size or --ipc=host), or {FIX}."
        )


def _page_lock(flat: torch.Tensor) -> None:
    """Page-lock this process' mapping, and unlock it when the last view of it is gone (a re-bind
    after a refresh or resume maps new bases; the old mapping must not stay registered)."""
    cudart, pointer = torch.cuda.cudart(), flat.data_ptr()
    error = cudart.cudaHostRegister(pointer, flat.numel() * flat.element_size(), 0)
    if int(error) != 0:
        raise RuntimeError(f"cudaHostRegister of the shared bases failed (CUDA error {int(error)}); {FIX}.")
    weakref.finalize(flat, cudart.cudaHostUnregister, pointer)


def _together(step: Callable[[], None]) -> None:
    """Run `step` on every process; if it fails on any, raise on all (after all have finished it)."""
    try:
        step()
        failure = None
    except (OSError, RuntimeError) as error:
        failure = f"process {dist.get_rank()}: {error}"
    failures: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    reported = [failure for failure in failures if failure is not None]
    if reported:
        raise RuntimeError("Sharing the offloaded bases on the node failed: " + "; ".join(reported))
