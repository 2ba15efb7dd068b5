"""The arithmetic of `trl_nullspace.backends.zero.fragments`, without DeepSpeed: any split of a flattened
matrix into contiguous fragments (as ZeRO partitions it) must give back exactly `M U` when the
fragments' shares are summed, and `M − R Uᵀ` when each fragment subtracts its part. And ZeRO-3's
gradient projection at the start of DeepSpeed's step, against a stand-in for its optimizer."""

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from trl_nullspace.backends.zero.fragments import (
    add_fragment_coefficients,
    fragment_pieces,
    rows_cut_by,
    subtract_fragment_projection,
)
from trl_nullspace.backends.zero.master import RowExchangeZeroProjector, ZeroMasterProjector, exchange_runs
from trl_nullspace.backends.zero.step_start import Zero3GradientProjector
from trl_nullspace.projection.constrained import ConstrainedParameter


@pytest.mark.parametrize(
    "rows, row_length, boundaries",
    [
        (5, 8, [0, 13, 27, 40]),  # fragments start and end inside rows
        (4, 6, [0, 12, 24]),  # fragments of whole rows
        (3, 10, [0, 4, 7, 30]),  # a fragment inside one row
        (1, 40, [0, 17, 40]),  # the gradient method's 1×numel view
        (6, 4, [0, 24, 24]),  # a rank whose fragment is empty
    ],
)
def test_fragments_reassemble_the_projection_exactly(rows, row_length, boundaries):
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(rows, row_length, generator=generator, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(row_length, 3, generator=generator, dtype=torch.float64)).Q
    flat = matrix.flatten().clone()
    fragments = [
        (fragment_pieces(start, end - start, row_length), flat[start:end])
        for start, end in zip(boundaries[:-1], boundaries[1:], strict=True)
    ]
    for pieces, values in fragments:
        assert sum(piece.numel for piece in pieces) == values.numel()

    coefficients = torch.zeros(rows, 3, dtype=torch.float64)
    for pieces, values in fragments:
        add_fragment_coefficients(pieces, values, basis, coefficients)
    torch.testing.assert_close(coefficients, matrix @ basis, rtol=0, atol=1e-12)

    anchor = torch.randn(rows, 3, generator=generator, dtype=torch.float64)
    residual = coefficients - anchor
    for pieces, values in fragments:
        subtract_fragment_projection(pieces, values, basis, residual)
    projected = flat.view(rows, row_length)
    torch.testing.assert_close(projected, matrix - residual @ basis.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(projected @ basis, anchor, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "boundaries, row_length, cut",
    [
        ([24, 48], 8, []),  # partitions of whole rows: nothing to exchange
        ([20, 44], 8, [2, 5]),  # each boundary inside a row
        ([3, 6, 9], 10, [0]),  # partitions smaller than a row: one row spans all ranks
        ([17], 40, [0]),  # the gradient method's single row
    ],
)
def test_rows_cut_by_partition_boundaries(boundaries, row_length, cut):
    assert rows_cut_by(boundaries, row_length) == cut


class _OneRankZero3:
    """The part of DeepSpeed's ZeRO-3 optimizer the gradient projection uses, on a one-process group
    (each partition whole): gradient partitions are read as fp32 copies, as DeepSpeed's are from its
    default bf16 accumulation or from host memory, so a projection not written back is lost."""

    def __init__(self, parameters: list[torch.nn.Parameter], generator: torch.Generator):
        self.masters = {id(p): p.detach().flatten().clone() for p in parameters}
        self.gradients = {id(p): torch.randn(p.numel(), generator=generator) for p in parameters}
        self.steps = 0
        for index, parameter in enumerate(parameters):
            parameter.ds_id, parameter.ds_persist, parameter._z3_optimizer = index, False, self
            parameter.ds_tensor = parameter.detach().flatten().clone()
            parameter.ds_tensor.ds_numel = parameter.numel()

    def step(self) -> None:
        self.steps += 1

    def get_local_fp32_grad_for_param(self, parameter: torch.nn.Parameter) -> torch.Tensor:
        return self.gradients[id(parameter)].clone()

    def set_local_grad_for_param(self, value: torch.Tensor, parameter: torch.nn.Parameter) -> None:
        self.gradients[id(parameter)].copy_(value.flatten())

    def get_local_fp32_param(self, parameter: torch.nn.Parameter) -> torch.Tensor:
        return self.masters[id(parameter)]

    def _get_param_partition_group(self, parameter: torch.nn.Parameter) -> None:
        return None  # the world

    def _get_param_partition_rank(self, parameter: torch.nn.Parameter) -> int:
        return 0


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("projector_class", [ZeroMasterProjector, RowExchangeZeroProjector])
def test_zero3_gradient_projection_writes_back_each_partition_and_refuses_a_step_without_it(
    one_process_group, projector_class
):
    """At the start of DeepSpeed's ZeRO-3 step every gradient partition is projected, `G − G U Uᵀ`,
    and written back (DeepSpeed's reads are copies); a step taken without the projection makes the
    trainer's check raise; a NaN gradient raises unless a loss scale makes it an overflow to skip."""
    generator = torch.Generator().manual_seed(0)
    parameters = [torch.nn.Parameter(torch.randn(rows, 6, generator=generator)) for rows in (5, 4)]
    basis = torch.linalg.qr(torch.randn(6, 3, generator=generator)).Q
    constrained = [
        ConstrainedParameter(f"w{index}", parameter, basis, flat=False, zero_anchor=False)
        for index, parameter in enumerate(parameters)
    ]
    optimizer = _OneRankZero3(parameters, generator)
    before = {id(p): optimizer.gradients[id(p)].clone().view(p.shape) for p in parameters}
    projection = Zero3GradientProjector(projector_class(constrained, torch.device("cpu")), optimizer, False)

    optimizer.step()
    projection.check_ran()
    assert optimizer.steps == 1
    for parameter in parameters:
        gradient = optimizer.gradients[id(parameter)].view(parameter.shape)
        expected = before[id(parameter)] - before[id(parameter)] @ basis @ basis.T
        torch.testing.assert_close(gradient, expected, rtol=0, atol=1e-6)
        assert (gradient - before[id(parameter)]).abs().max() > 0.1

    _OneRankZero3.step(optimizer)  # a DeepSpeed that steps some other way
    with pytest.raises(RuntimeError, match="stepped without the trl-nullspace gradient projection"):
        projection.check_ran()

    optimizer.gradients[id(parameters[1])][3] = float("nan")
    with pytest.raises(FloatingPointError, match="w1"):
        optimizer.step()
    projection.remove()
    assert optimizer.step.__func__ is _OneRankZero3.step

    projection = Zero3GradientProjector(projector_class(constrained, torch.device("cpu")), optimizer, True)
    kept = {id(p): optimizer.gradients[id(p)].clone() for p in parameters}
    optimizer.step()  # fp16: an overflow DeepSpeed skips the step for, left as it is
    projection.check_ran()
    assert all(torch.allclose(optimizer.gradients[id(p)], kept[id(p)], equal_nan=True) for p in parameters)


def test_cut_rows_are_exchanged_in_runs_that_fit_the_block():
    """ZeRO-3 cuts every weight world − 1 times: the cut rows are exchanged in runs of whole weights that fit in
    the block (a larger weight alone), in order, so a rank never holds every weight's cut rows at once."""
    fragments = [SimpleNamespace(exchanged_rows=range(rows), row_length=50) for rows in (2, 2, 6, 1, 0, 1)]
    assert exchange_runs(fragments, 800) == [slice(0, 2), slice(2, 3), slice(3, 6)]
    assert exchange_runs(fragments, None) == [slice(0, 6)]
