"""The activation estimate shared by processes, when routing leaves a target unseen on one of them.

Each process reads its share of the reference batches (`collect(..., across_processes=True)`). An
expert kept as its own Linear runs only for the tokens routed to it, so one process' share may
never reach it: the processes must still sum the same statistics, and raise together if no share
reached it, rather than one raising while the others wait in the collective.
"""

import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from trl_nullspace.estimation.activation import InputCovarianceCollector
from trl_nullspace.estimation.reference import ReferenceBatch

PORT = 29562
HIDDEN = 4


class _RoutedLayer(nn.Module):
    """One decoder layer whose experts are separate Linears; a batch goes to the expert its first
    token names (0 or 1: expert 2 is never chosen)."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(HIDDEN, HIDDEN)
        self.experts = nn.ModuleList(nn.Linear(HIDDEN, HIDDEN) for _ in range(3))

    def forward(self, hidden: torch.Tensor, expert: int) -> torch.Tensor:
        return self.experts[expert](self.up(hidden))


class _RoutedModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(8, HIDDEN)
        self.layers = nn.ModuleList([_RoutedLayer()])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, use_cache: bool) -> torch.Tensor:
        return self.layers[0](self.embed(input_ids), int(input_ids[0, 0]) % 2)


def _batches() -> list[ReferenceBatch]:
    """Batches 0 and 2 (the first process' share of two) go to expert 0, batch 1 (the second's) to expert 1."""
    ids = [[0, 3, 5, 7], [1, 2, 4, 6], [2, 7, 1, 3]]
    return [ReferenceBatch(torch.tensor([row]), torch.ones(1, 4, dtype=torch.long)) for row in ids]


def _collector(model: _RoutedModel, experts: int) -> InputCovarianceCollector:
    linears = {"layers.0.up": model.layers[0].up}
    linears |= {f"layers.0.experts.{index}": model.layers[0].experts[index] for index in range(experts)}
    return InputCovarianceCollector(linears)


def _estimate(rank: int, world: int, directory: str, experts: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(PORT))
    # A short timeout: a process left waiting in a collective fails the test instead of hanging it.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    model = _RoutedModel()
    collector = _collector(model, experts)
    try:
        collector.collect(model, _batches(), False, across_processes=True)
        report = {"covariances": collector.covariances, "sums": collector.sums, "counts": collector.token_counts}
    except RuntimeError as error:
        report = {"error": str(error)}
    torch.save(report, os.path.join(directory, f"{rank}.pt"))
    dist.destroy_process_group()


def _run(tmp_path, experts: int) -> list[dict]:
    mp.spawn(_estimate, args=(2, str(tmp_path), experts), nprocs=2)
    return [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]


def test_processes_sum_an_expert_only_one_of_them_reached(tmp_path):
    """Expert 0 is reached only by the first process' batches, expert 1 only by the second's: both
    processes end with the single process' statistics of all three batches, second moments and the
    sums the harm-keyed exemption's class means come from."""
    model = _RoutedModel()
    alone = _collector(model, experts=2)
    alone.collect(model, _batches(), False)
    reports = _run(tmp_path, experts=2)
    for report in reports:
        assert "error" not in report, report
        assert report["covariances"].keys() == alone.covariances.keys()
        for name, covariance in alone.covariances.items():
            assert torch.allclose(report["covariances"][name], covariance), name
            assert torch.allclose(report["sums"][name], alone.sums[name]), name
        assert report["counts"] == alone.token_counts


def test_an_expert_no_process_reached_is_reported_by_every_process(tmp_path):
    reports = _run(tmp_path, experts=3)
    assert all("layers.0.experts.2" in report.get("error", "") for report in reports), reports
    assert all("never called on the reference data" in report["error"] for report in reports)
