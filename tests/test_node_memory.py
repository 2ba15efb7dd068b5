"""`nullspace_offload_share_node`: the node's processes read the offloaded bases from one copy."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trl_nullspace.backends import node_memory

PORT = 29561


def _share(rank: int, world: int, directory: str, shared_memory: list[str]) -> None:
    """One of `world` gloo processes on this node, each looking for shared memory where
    `shared_memory[rank]` says: share two tensors, then let rank 0 write into its copy and report
    what each process reads there (and any error, as a JSON file)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(PORT))
    node_memory.SHARED_MEMORY = shared_memory[rank]
    dist.init_process_group("gloo", rank=rank, world_size=world)
    report: dict = {}
    try:
        torch.manual_seed(0)
        tensors = [torch.randn(5, 3), torch.randn(4, 2)[:, :1]]  # the same on every process; one a column slice
        views, shared = node_memory.share_on_node(tensors)
        report["shared"] = shared
        report["equal"] = all(torch.equal(view, tensor) for view, tensor in zip(views, tensors, strict=True))
        dist.barrier()
        if rank == 0:
            views[1][2, 0] = 123.0
        dist.barrier()
        report["read"] = views[1][2, 0].item()
    except RuntimeError as error:
        report["error"] = str(error)
    with open(os.path.join(directory, f"{rank}.json"), "w") as handle:
        json.dump(report, handle)
    dist.destroy_process_group()


def _run(tmp_path, shared_memory: list[str]) -> list[dict]:
    mp.spawn(_share, args=(2, str(tmp_path), shared_memory), nprocs=2)
    return [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]


def test_processes_on_a_node_read_one_copy_and_leave_no_file(tmp_path):
    before = {name for name in os.listdir("/dev/shm") if name.startswith("trl-nullspace-bases-")}
    reports = _run(tmp_path, ["/dev/shm", "/dev/shm"])
    assert all(report.get("shared") and report.get("equal") for report in reports), reports
    # What one process writes, the other reads: one copy in memory, not two.
    assert [report["read"] for report in reports] == [123.0, 123.0], reports
    after = {name for name in os.listdir("/dev/shm") if name.startswith("trl-nullspace-bases-")}
    assert after <= before  # the name is gone once both mapped it


@pytest.mark.parametrize("failing", ["writer", "reader"])
def test_a_failure_on_one_process_is_raised_on_all_with_the_fix(tmp_path, failing):
    """No shared memory where the first process writes, or a process that cannot see the file the
    first wrote (as a container with its own /dev/shm would): every process raises, none waits."""
    elsewhere = str(tmp_path / "elsewhere")
    os.makedirs(elsewhere)
    places = [str(tmp_path / "no-such-shared-memory"), "/dev/shm"] if failing == "writer" else ["/dev/shm", elsewhere]
    reports = _run(tmp_path, places)
    assert all("nullspace_offload_share_node: false" in report.get("error", "") for report in reports), reports
    expected = "process 0: No " if failing == "writer" else "process 1: " + elsewhere
    assert all(expected in report["error"] for report in reports), reports
