"""Processes holding different capability subspaces are refused at start-up, by every process together.

Each process projects its own replica (DDP) or its own rows (ZeRO, FSDP2) with its own copy of the bases,
loaded or estimated by itself: if one bit differs the replicas drift apart, unconstrained by anything.
`SubspaceSource._check_same_on_every_process` compares checksums over all processes
(`backends.agreement`), and all of them must raise, none left waiting in a collective.
"""

import os
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trl_nullspace.training.source import SubspaceSource

PORT = 29563


def _check(rank: int, world: int, directory: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(PORT))
    # A short timeout: a process left waiting in a collective fails the test instead of hanging it.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    source = SimpleNamespace(accelerator=SimpleNamespace(num_processes=world, device=torch.device("cpu")))
    outcomes = []
    for differ in (False, True):
        basis = torch.linalg.qr(torch.randn(8, 3, generator=torch.Generator().manual_seed(0))).Q
        if differ and rank == 1:  # one bit of one basis, on one process
            basis[0, 0] = torch.nextafter(basis[0, 0], torch.tensor(2.0))
        try:
            SubspaceSource._check_same_on_every_process(source, SimpleNamespace(bases={"layers.0.mlp": basis}))
            outcomes.append("accepted")
        except RuntimeError as error:
            outcomes.append(str(error))
        dist.barrier()  # both got here: neither waits in the check's collective
    torch.save(outcomes, os.path.join(directory, f"{rank}.pt"))
    dist.destroy_process_group()


def test_processes_with_one_bit_apart_in_their_subspaces_all_refuse_to_train(tmp_path):
    mp.spawn(_check, args=(2, str(tmp_path)), nprocs=2)
    same, different = zip(*(torch.load(tmp_path / f"{rank}.pt") for rank in range(2)), strict=True)
    assert same == ("accepted", "accepted")
    assert all("Processes hold different capability subspaces" in outcome for outcome in different), different
    assert all("nullspace_cache_path" in outcome for outcome in different)  # the fix is named
