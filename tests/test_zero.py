"""The arithmetic of `trl_nullspace.zero_fragments`, without DeepSpeed: any split of a flattened
matrix into contiguous fragments (as ZeRO partitions it) must give back exactly `M U` when the
fragments' shares are summed, and `M − R Uᵀ` when each fragment subtracts its part."""

import pytest
import torch

from trl_nullspace.zero_fragments import (
    add_fragment_coefficients,
    fragment_pieces,
    rows_cut_by,
    subtract_fragment_projection,
)


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
