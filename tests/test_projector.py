"""The projection math on its own: idempotent, orthogonal to U, identity on the null space."""

import pytest
import torch

from trl_nullspace.backends.fsdp2 import RowShardProjector
from trl_nullspace.estimation.rank import RankSelection
from trl_nullspace.projection.basis import SharedBasis
from trl_nullspace.projection.constrained import ConstrainedParameter, diverged_step_error
from trl_nullspace.projection.projector import SubspaceProjector


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
    with pytest.raises(FloatingPointError, match=r"at the optimizer step in \['1.weight'\]"):
        shards.enforce_anchors()


def test_a_rank_whose_own_weights_are_finite_still_says_where_the_step_diverged():
    """Under ZeRO every rank raises together, also one whose own share of the weights is finite."""
    assert "another process's share" in str(diverged_step_error([]))


@pytest.mark.parametrize("block_columns", [1, 4, 6, 100])
def test_offloaded_blocks_project_exactly_as_the_whole_basis(block_columns):
    """`nullspace_offload` applies the basis a few columns at a time (here 1, 4, 6 of 6 uneven, or all):
    the weight, the anchor it returns to, the gradient's projection and the norms they report must be
    the whole-basis projection's, for whole weights and for a block of rows (FSDP2's shards)."""
    basis = _basis(16, 6)
    original = torch.randn(5, 16)
    step = torch.randn(5, 16)
    results = {}
    for offloaded in (False, True):
        shared = SharedBasis(basis, block_bytes=block_columns * 16 * 4 if offloaded else None)
        parameter = torch.nn.Parameter(original.clone())
        item = ConstrainedParameter("w", parameter, shared, flat=False, zero_anchor=False)
        item.reset_anchor()
        with torch.no_grad():
            parameter.add_(step)
        removed = torch.linalg.vector_norm(item.enforce_on(parameter.data[:3], rows=slice(0, 3)))
        removed = torch.linalg.vector_norm(torch.stack([removed, torch.linalg.vector_norm(item.enforce_anchor())]))
        parameter.grad = step.clone()
        removed_sq, total_sq = item.remove_from_gradient(apply=True)
        results[offloaded] = (parameter.detach().clone(), item.anchor, parameter.grad.clone(), removed, removed_sq)
        assert len(shared.columns) == (-(-6 // block_columns) if offloaded else 1)
    for whole, streamed in zip(results[False], results[True], strict=True):
        assert torch.allclose(whole, streamed, atol=1e-5), (whole, streamed)
    weights, anchor = results[True][0], results[True][1]
    assert torch.allclose(weights @ basis, original @ basis, atol=1e-5)  # back on the anchor
    assert (weights - original).norm() > 0.5  # the null-space part of the step is kept
    assert torch.allclose(anchor, original @ basis, atol=1e-5)


def test_an_offloaded_empty_basis_leaves_the_weight_alone():
    """An expert no reference token reaches has a rank-0 basis: offloaded, it is one empty block."""
    parameter = torch.nn.Parameter(torch.randn(3, 8))
    original = parameter.detach().clone()
    item = ConstrainedParameter("w", parameter, SharedBasis(torch.zeros(8, 0), block_bytes=64), False, False)
    item.reset_anchor()
    assert float(torch.linalg.vector_norm(item.enforce_anchor())) == 0.0
    assert torch.equal(parameter.detach(), original) and item.anchor.shape == (3, 0)


def test_weights_reading_one_input_share_one_copy_of_its_basis(model):
    """q/k/v (and gate/up) read one input and share one basis: when the weights move to the device
    they are stepped on, the basis is copied there once, not once per weight."""
    from trl_nullspace.estimation.activation import estimate_activation_subspace
    from trl_nullspace.estimation.reference import ReferenceBatch
    from trl_nullspace.projection.targets import find_target_linears

    batch = ReferenceBatch(torch.randint(3, 30, (2, 12)), torch.ones(2, 12, dtype=torch.long))
    subspace = estimate_activation_subspace(
        model, [batch], find_target_linears(model, None), RankSelection(energy=0.9), False
    )
    projector = SubspaceProjector.bind(model, subspace)
    for item in projector.constrained:
        item.move_to(torch.device("meta"))  # a device other than the subspace's, as the accelerator is
    by_name = {item.name.removesuffix(".weight"): item for item in projector.constrained}
    attention = [by_name[f"model.layers.0.self_attn.{name}"].basis for name in ("q_proj", "k_proj", "v_proj")]
    gate, up = (by_name[f"model.layers.0.mlp.{name}"].basis for name in ("gate_proj", "up_proj"))
    assert attention[0].device.type == "meta"
    assert attention[0] is attention[1] is attention[2] and gate is up
    copies = {id(item.basis) for item in projector.constrained}
    assert len(copies) == len(subspace.bases)


@pytest.mark.parametrize("block_bytes", [None, 16 * 4 * 1], ids=["resident", "offloaded"])
def test_complement_storage_projects_as_the_basis(block_bytes):
    """`nullspace_basis_storage="smaller"`: with k = 12 of 16 directions protected, the complement N
    (16×4) is kept and the projections use N Nᵀ = I − U Uᵀ and the weights as last projected. Over
    several steps the weights, the removed norms and the projected gradient must be the basis'."""
    basis = _basis(16, 12)
    original = torch.randn(5, 16)
    steps = [torch.randn(5, 16) for _ in range(3)]
    results = {}
    for complement in (False, True):
        shared = SharedBasis(basis, block_bytes=block_bytes if complement else None, complement=complement)
        parameter = torch.nn.Parameter(original.clone())
        item = ConstrainedParameter("w", parameter, shared, flat=False, zero_anchor=False)
        item.reset_anchor()
        item.take_previous()
        removed = []
        for step in steps:
            with torch.no_grad():
                parameter.add_(step)
            removed.append(torch.linalg.vector_norm(item.enforce_anchor()))
        parameter.grad = steps[0].clone()
        removed_sq, _ = item.remove_from_gradient(apply=True)
        results[complement] = (parameter.detach().clone(), torch.stack(removed), parameter.grad.clone(), removed_sq)
        assert shared.stored_columns == (4 if complement else 12) and item.has_anchor != complement
    for whole, complemented in zip(results[False], results[True], strict=True):
        assert torch.allclose(whole, complemented, atol=1e-4), (whole, complemented)
    weights = results[True][0]
    assert (weights - original).norm() > 0.5 and ((weights - original) @ basis).abs().max() < 1e-5


def test_complement_storage_moves_lora_a_into_the_null_space_and_keeps_it_there():
    """LoRA `A` with a complement basis: moved into the null space when bound, and kept there by the
    update projection from its values as last projected (`B A U = 0` for any `B`)."""
    basis = _basis(16, 12)
    lora_a = torch.nn.Parameter(torch.randn(4, 16))
    item = ConstrainedParameter("lora_A", lora_a, SharedBasis(basis, complement=True), flat=False, zero_anchor=True)
    item.reset_anchor()
    assert (lora_a.detach() @ basis).abs().max() < 1e-5
    item.take_previous()
    with torch.no_grad():
        lora_a.add_(torch.randn(4, 16))
    item.enforce_anchor()
    assert (lora_a.detach() @ basis).abs().max() < 1e-5 and not item.has_anchor


def test_a_released_basis_frees_its_bytes_and_refuses_to_be_read():
    """ZeRO-1/2 ranks release the bases no fragment of theirs reads: the bytes go, and a projection that
    reached for one anyway would raise instead of running without it. Offloaded bases stay in host memory."""
    basis = torch.linalg.qr(torch.randn(16, 4)).Q
    resident = SharedBasis(basis)
    resident.release()
    assert resident.released and resident.resident_bytes == 0
    with pytest.raises(RuntimeError, match="released on this rank"):
        next(resident.blocks(torch.device("cpu"), torch.float32))
    resident.move(torch.device("cpu"))  # moving what is not held is a no-op, not an error
    offloaded = SharedBasis(basis, block_bytes=64)
    offloaded.release()
    assert not offloaded.released and offloaded.resident_bytes == 16 * 4 * 4
