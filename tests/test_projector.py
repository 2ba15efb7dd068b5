"""The projection math on its own: idempotent, orthogonal to U, identity on the null space."""

import pytest
import torch

from trl_nullspace.fsdp import RowShardProjector
from trl_nullspace.projector import ConstrainedParameter, diverged_step_error
from trl_nullspace.rank import RankSelection


def _basis(n: int, k: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=generator)).Q


def _project_gradient(gradient: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    parameter = torch.nn.Parameter(torch.zeros_like(gradient))
    parameter.grad = gradient.clone()
    ConstrainedParameter("w", parameter, basis, flat=False, zero_anchor=False).remove_from_gradient(apply=True)
    return parameter.grad


def test_gradient_projection_is_idempotent_and_orthogonal():
    basis = _basis(16, 5)
    gradient = torch.randn(8, 16)
    once = _project_gradient(gradient, basis)
    twice = _project_gradient(once, basis)
    assert torch.allclose(once, twice, atol=1e-6)
    assert (once @ basis).abs().max() < 1e-5
    assert (once - gradient).norm() > 0.1


def test_projection_leaves_null_space_vectors_unchanged():
    basis = _basis(16, 5)
    inside_null_space = torch.randn(8, 16)
    inside_null_space -= (inside_null_space @ basis) @ basis.T
    assert torch.allclose(_project_gradient(inside_null_space, basis), inside_null_space, atol=1e-6)


def test_removed_fraction_matches_the_component_in_the_subspace():
    basis = _basis(16, 4)
    parameter = torch.nn.Parameter(torch.zeros(3, 16))
    parameter.grad = torch.randn(3, 16)
    expected = (parameter.grad @ basis).norm() ** 2
    removed_sq, total_sq = ConstrainedParameter("w", parameter, basis, False, False).remove_from_gradient(apply=False)
    assert torch.isclose(removed_sq, expected, rtol=1e-5)
    assert torch.isclose(total_sq, parameter.grad.norm() ** 2, rtol=1e-5)


def test_update_projection_restores_the_anchor_after_any_step():
    basis = _basis(16, 6)
    parameter = torch.nn.Parameter(torch.randn(4, 16))
    original = parameter.detach().clone()
    item = ConstrainedParameter("w", parameter, basis, flat=False, zero_anchor=False)
    item.reset_anchor()
    with torch.no_grad():
        parameter.add_(torch.randn(4, 16))  # any optimizer step, weight decay included
    item.enforce_anchor()
    delta = parameter.detach() - original
    assert (delta @ basis).abs().max() < 1e-5
    assert delta.norm() > 0.5  # the null-space part of the step is kept


def test_flat_view_projects_a_whole_parameter():
    basis = _basis(24, 3)
    parameter = torch.nn.Parameter(torch.zeros(2, 3, 4))
    parameter.grad = torch.randn(2, 3, 4)
    ConstrainedParameter("p", parameter, basis, flat=True, zero_anchor=False).remove_from_gradient(apply=True)
    assert (parameter.grad.reshape(1, -1) @ basis).abs().max() < 1e-5


def test_zero_anchor_moves_lora_a_into_the_null_space():
    basis = _basis(16, 6)
    lora_a = torch.nn.Parameter(torch.randn(4, 16))
    ConstrainedParameter("lora_A", lora_a, basis, flat=False, zero_anchor=True).reset_anchor()
    assert (lora_a.detach() @ basis).abs().max() < 1e-5


def test_basis_dimension_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="dimension 8 but the parameter needs 16"):
        ConstrainedParameter("w", torch.nn.Parameter(torch.zeros(4, 16)), _basis(8, 2), False, False)


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        (RankSelection(energy=0.5), 1),
        (RankSelection(energy=0.9), 2),
        (RankSelection(energy=1.0), 3),
        (RankSelection(eigenvalue_threshold=0.05), 2),
        (RankSelection(eigenvalue_threshold=0.0), 3),
        (RankSelection(energy=1.0, max_rank=2), 2),
    ],
)
def test_rank_selection(selection, expected):
    eigenvalues = torch.tensor([10.0, 6.0, 0.4, 0.0])
    assert selection.rank(eigenvalues) == expected


def test_rank_selection_rejects_nan():
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        RankSelection(energy=0.9).rank(torch.tensor([1.0, float("nan")]))


def test_row_shard_projection_names_the_weights_a_diverged_step_made_non_finite():
    """FSDP2's guard (it never sees whole gradients): NaN weights after a step are named, not spread."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4))
    constrained = [
        ConstrainedParameter(f"{index}.weight", model[index].weight, _basis(columns, 3), flat=False, zero_anchor=False)
        for index, columns in ((0, 16), (1, 8))
    ]
    for item in constrained:
        item.reset_anchor()
    shards = RowShardProjector(model, constrained)
    with torch.no_grad():
        model[0].weight.add_(0.1)
    assert float(shards.enforce_anchors()) > 0  # a finite step is projected; the norm stays a tensor
    with torch.no_grad():
        model[1].weight[2, 5] = float("nan")
    with pytest.raises(FloatingPointError, match=r"after the optimizer step in \['1.weight'\]"):
        shards.enforce_anchors()


def test_a_rank_whose_own_weights_are_finite_still_says_where_the_step_diverged():
    """Under ZeRO every rank raises together, also one whose own share of the weights is finite."""
    assert "another process's share" in str(diverged_step_error([]))
