"""The product's promise: reference outputs unchanged, safety outputs changed.

Strict setting: activation subspace with an eigenvalue threshold of 1e-10 (every direction the
24 reference tokens use), AdamW with weight decay, a learning rate large enough to move the model.
"""

import pytest
import torch
from trl import SFTConfig, SFTTrainer

from tests.conftest import logits_on, training_kwargs
from trl_nullspace import NullSpaceSFTConfig, NullSpaceSFTTrainer

EXACT_TOLERANCE = 1e-4
CLEARLY_MOVED = 1e-2


def _train_null_space(model, tokenizer, safety_dataset, reference_dataset, tmp_path, **overrides):
    config_kwargs = dict(nullspace_eigenvalue_threshold=1e-10)
    config_kwargs.update(overrides)
    trainer_kwargs = training_kwargs(tmp_path, **{k: v for k, v in config_kwargs.items() if not k.startswith("null")})
    nullspace_kwargs = {k: v for k, v in config_kwargs.items() if k.startswith("null")}
    trainer = NullSpaceSFTTrainer(
        model=model,
        args=NullSpaceSFTConfig(**trainer_kwargs, **nullspace_kwargs),
        train_dataset=safety_dataset,
        processing_class=tokenizer,
        reference_dataset=reference_dataset,
    )
    reference = trainer.nullspace.source.reference_batches
    before = logits_on(trainer.model, reference)
    trainer.train()
    return trainer, reference, before


def test_update_projection_preserves_reference_logits_exactly(
    model, tokenizer, safety_dataset, reference_dataset, safety_prompts, tmp_path
):
    safety_before = logits_on(model, safety_prompts)
    trainer, reference, before = _train_null_space(model, tokenizer, safety_dataset, reference_dataset, tmp_path)
    reference_drift = (logits_on(trainer.model, reference) - before).abs().max().item()
    safety_change = (logits_on(trainer.model, safety_prompts) - safety_before).abs().max().item()
    print(f"update target: reference drift {reference_drift:.2e}, safety change {safety_change:.2e}")
    assert reference_drift < EXACT_TOLERANCE
    assert safety_change > 0.1
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]  # it did learn the safety data


def test_plain_sft_moves_reference_logits(model, tokenizer, safety_dataset, reference_dataset, tmp_path):
    """The same run with TRL's SFTTrainer: proves the preservation test above can fail."""
    from trl_nullspace.estimation.reference import tokenize_reference

    reference = tokenize_reference(reference_dataset, tokenizer, batch_size=8, max_length=512)
    before = logits_on(model, reference)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**training_kwargs(tmp_path)),
        train_dataset=safety_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    assert (logits_on(trainer.model, reference) - before).abs().max().item() > CLEARLY_MOVED


def test_gradient_target_with_adamw_leaks_into_the_subspace(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path
):
    """What the papers do (project G, then AdamW): Adam's per-coordinate scaling and weight decay put
    components back into span(U), so reference logits move. Reported, and asserted to stay true."""
    trainer, reference, before = _train_null_space(
        model, tokenizer, safety_dataset, reference_dataset, tmp_path, nullspace_projection_target="gradient"
    )
    drift = (logits_on(trainer.model, reference) - before).abs().max().item()
    print(f"gradient target + AdamW(weight_decay=0.1): reference drift {drift:.2e}")
    assert drift > 100 * EXACT_TOLERANCE


def test_gradient_target_with_plain_sgd_is_exact(model, tokenizer, safety_dataset, reference_dataset, tmp_path):
    """With SGD and no weight decay the update is the projected gradient, so projecting G suffices."""
    trainer, reference, before = _train_null_space(
        model,
        tokenizer,
        safety_dataset,
        reference_dataset,
        tmp_path,
        nullspace_projection_target="gradient",
        optim="sgd",
        weight_decay=0.0,
        learning_rate=0.5,
    )
    drift = (logits_on(trainer.model, reference) - before).abs().max().item()
    assert drift < EXACT_TOLERANCE


def test_gradient_method_keeps_updates_orthogonal_to_reference_gradients(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path
):
    """OGPSA-style subspace: the total parameter change has no component along any basis vector."""
    initial = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    trainer, _, _ = _train_null_space(
        model,
        tokenizer,
        safety_dataset,
        reference_dataset,
        tmp_path,
        nullspace_method="gradient",
        nullspace_eigenvalue_threshold=None,
        nullspace_energy=0.999,
    )
    projector = trainer.nullspace_projector
    moved = 0.0
    for item in projector.constrained:
        delta = (item.parameter.detach() - initial[item.name]).reshape(1, -1)
        assert item.rank >= 1
        assert (delta @ item.basis).abs().max().item() < 1e-5 * max(1.0, delta.norm().item())
        moved += delta.norm().item()
    assert moved > 0.1


@pytest.mark.parametrize("accumulation", [1, 3])
def test_projection_runs_once_per_optimizer_step(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path, projection_calls, accumulation
):
    trainer, _, _ = _train_null_space(
        model,
        tokenizer,
        safety_dataset,
        reference_dataset,
        tmp_path,
        max_steps=4,
        gradient_accumulation_steps=accumulation,
    )
    assert len(projection_calls) == trainer.state.global_step == 4
    logged = [
        entry["nullspace/removed_frac"] for entry in trainer.state.log_history if "nullspace/removed_frac" in entry
    ]
    assert len(logged) == 4 and all(0.0 < value < 1.0 for value in logged)
    assert all(torch.isfinite(torch.tensor(logged)))


def test_bfloat16_projection_preserves_to_bf16_round_off(
    model, tokenizer, safety_dataset, reference_dataset, safety_prompts, tmp_path
):
    """`nullspace_projection_dtype="bfloat16"`: the update's products run in bf16, so each step's
    correction carries bf16 round-off (~2⁻⁸ of ‖W U‖) that the next step corrects again instead of
    accumulating. The drift must sit between fp32's (< 1e-4) and plain training's (~3.8), far below
    the latter. Measured: 0.08 with the default `both` target, 4e-3 with `update` alone (its steps
    in the allowed directions are smaller)."""
    safety_before = logits_on(model, safety_prompts)
    trainer, reference, before = _train_null_space(
        model, tokenizer, safety_dataset, reference_dataset, tmp_path, nullspace_projection_dtype="bfloat16"
    )
    drift = (logits_on(trainer.model, reference) - before).abs().max().item()
    safety_change = (logits_on(trainer.model, safety_prompts) - safety_before).abs().max().item()
    print(f"bf16 projection: reference drift {drift:.2e}, safety change {safety_change:.2e}")
    assert drift < 0.1
    assert safety_change > 0.1


def test_offloaded_bases_train_as_the_resident_ones(model, tokenizer, safety_dataset, reference_dataset, tmp_path):
    """`nullspace_offload`: bases and anchors in host memory, applied a few columns at a time (1 KiB
    blocks, 4 columns of the tiny model's 64-wide inputs). Training must end at the weights the
    resident bases give (the block-wise projection is the same projection) and keep reference
    outputs exactly, under the default `both` target."""
    import copy

    resident_model, initial = copy.deepcopy(model), copy.deepcopy(model.state_dict())
    trainer, reference, before = _train_null_space(
        model,
        tokenizer,
        safety_dataset,
        reference_dataset,
        tmp_path / "offloaded",
        nullspace_offload=True,
        nullspace_offload_block_mib=2**-10,
    )
    assert min(len(item.shared.columns) for item in trainer.nullspace_projector.constrained) > 2
    assert trainer.nullspace_settings()["offload"] is True
    assert (logits_on(trainer.model, reference) - before).abs().max().item() < EXACT_TOLERANCE
    resident, _, _ = _train_null_space(
        resident_model, tokenizer, safety_dataset, reference_dataset, tmp_path / "whole"
    )
    gap, moved = _gap_and_move(trainer.model, resident.model, initial)
    assert gap < 1e-4 and moved > 1e-2, (gap, moved)


def test_smaller_storage_trains_as_the_basis(model, tokenizer, safety_dataset, tmp_path):
    """`nullspace_basis_storage="smaller"`: with enough reference tokens that some inputs keep more
    than half their directions, those bases are kept as their complements (the others as bases)
    and projected with N Nᵀ and the weights as last projected. The run must end at the basis run's
    weights, and every constrained weight's change must stay orthogonal to its basis, where plain TRL's
    is not."""
    import copy

    import datasets

    from trl_nullspace.data import toy

    reference = datasets.Dataset.from_dict(toy.as_text(toy.general_examples(40, seed=1)))
    settings = dict(nullspace_eigenvalue_threshold=None, nullspace_energy=0.999)
    basis_model, plain_model, initial = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model.state_dict())
    trainer, _, _ = _train_null_space(
        model,
        tokenizer,
        safety_dataset,
        reference,
        tmp_path / "smaller",
        nullspace_basis_storage="smaller",
        **settings,
    )
    complements = [item for item in trainer.nullspace_projector.constrained if item.shared.complement]
    assert 0 < len(complements) < len(trainer.nullspace_projector.constrained)  # mixed: each basis decides
    assert trainer.nullspace_projector.anchors().keys().isdisjoint(item.name for item in complements)
    resident, _, _ = _train_null_space(
        basis_model, tokenizer, safety_dataset, reference, tmp_path / "basis", **settings
    )
    gap, moved = _gap_and_move(trainer.model, resident.model, initial)
    assert gap < 1e-4 and moved > 1e-2, (gap, moved)
    subspace, names = trainer.nullspace_subspace, [item.name for item in trainer.nullspace_projector.constrained]
    assert _largest_change_in_subspace(trainer.model, initial, subspace, names) < 1e-4
    # The control: plain TRL under the same settings moves the same weights inside their subspaces.
    plain = SFTTrainer(
        model=plain_model,
        args=SFTConfig(**training_kwargs(tmp_path / "plain")),
        train_dataset=safety_dataset,
        processing_class=tokenizer,
    )
    plain.train()
    assert _largest_change_in_subspace(plain.model, initial, subspace, names) > 1e-2


@pytest.mark.parametrize("storage", ["basis", "smaller"])
def test_step_snapshots_train_as_the_anchors_and_hold_nothing_between_steps(
    model, tokenizer, safety_dataset, tmp_path, storage
):
    """`nullspace_step_snapshot`: each optimizer step's change is projected from a copy of the weights taken just
    before it, and no anchors (nor weights as last projected) are kept. The run must end where the run with kept
    state does (to fp32 round-off), keep every weight's change orthogonal to its basis, and hold no state after
    training; with complements and bases mixed (`smaller`), each path is checked."""
    import copy

    import datasets

    from trl_nullspace.data import toy

    reference = datasets.Dataset.from_dict(toy.as_text(toy.general_examples(40, seed=1)))
    settings = dict(nullspace_eigenvalue_threshold=None, nullspace_energy=0.999, nullspace_basis_storage=storage)
    kept_model, initial = copy.deepcopy(model), copy.deepcopy(model.state_dict())
    trainer, _, _ = _train_null_space(
        model, tokenizer, safety_dataset, reference, tmp_path / "snapshots", nullspace_step_snapshot=True, **settings
    )
    constrained = trainer.nullspace_projector.constrained
    assert all(item.anchor_state is None and item.previous_state is None for item in constrained)
    assert (storage == "smaller") == any(item.shared.complement for item in constrained)
    kept, _, _ = _train_null_space(kept_model, tokenizer, safety_dataset, reference, tmp_path / "kept", **settings)
    assert any(
        item.anchor_state is not None or item.previous_state is not None
        for item in kept.nullspace_projector.constrained
    )
    gap, moved = _gap_and_move(trainer.model, kept.model, initial)
    assert gap < 1e-5 and moved > 1e-2, (gap, moved)
    subspace, names = trainer.nullspace_subspace, [item.name for item in constrained]
    assert _largest_change_in_subspace(trainer.model, initial, subspace, names) < 1e-4


@pytest.mark.parametrize("step_snapshot", [False, True], ids=["kept state", "step snapshots"])
def test_bf16_complements_keep_every_change_out_of_the_span_they_store(
    model, tokenizer, safety_dataset, tmp_path, step_snapshot
):
    """`nullspace_complement_dtype="bfloat16"`: complements stored in half the bytes. Each projection leaves the
    step's change inside the stored (rounded) span, so the change since the start is orthogonal to that span's
    complement to fp32 round-off, over many steps (no error compounds: accumulated weights are never projected
    again), whether the state is kept or each step is snapshotted."""
    import datasets

    from trl_nullspace.data import toy
    from trl_nullspace.projection.basis import orthonormal_complement

    reference = datasets.Dataset.from_dict(toy.as_text(toy.general_examples(40, seed=1)))
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    trainer, _, _ = _train_null_space(
        model,
        tokenizer,
        safety_dataset,
        reference,
        tmp_path,
        nullspace_eigenvalue_threshold=None,
        nullspace_energy=0.999,
        nullspace_basis_storage="smaller",
        nullspace_complement_dtype="bfloat16",
        nullspace_step_snapshot=step_snapshot,
    )
    complements = [item for item in trainer.nullspace_projector.constrained if item.shared.complement]
    assert complements and all(item.shared.stored_dtype == torch.bfloat16 for item in complements)
    weights = dict(trainer.model.named_parameters())
    in_stored, in_estimated, moved = 0.0, 0.0, 0.0
    for item in complements:
        stored = item.shared.whole(item.device, torch.bfloat16)
        assert item.shared.resident_bytes == stored.numel() * 2  # no fp32 copy kept beside it
        protected = orthonormal_complement(stored.double()).double()  # exactly what the stored span leaves out
        change = (weights[item.name].detach() - initial[item.name]).double()
        in_stored = max(in_stored, (change @ protected).abs().max().item())
        estimated = trainer.nullspace_subspace.basis_for(item.name.removesuffix(".weight")).double()
        in_estimated = max(in_estimated, (change @ estimated).abs().max().item())
        moved = max(moved, change.abs().max().item())
    assert in_stored < 1e-6 and moved > 1e-2, (in_stored, moved)
    assert in_stored < in_estimated / 100  # the rounding rotates the span, and the constraint follows the stored one


def _gap_and_move(trained, other, initial: dict) -> tuple[float, float]:
    """The largest weight difference between two trained models, and how far the first moved."""
    weights = dict(other.named_parameters())
    gap = max((p - weights[name]).abs().max().item() for name, p in trained.named_parameters())
    moved = max((p - initial[name]).abs().max().item() for name, p in trained.named_parameters())
    return gap, moved


def _largest_change_in_subspace(model, initial: dict, subspace, names: list[str]) -> float:
    """max |(W − W₀) U| over the weights `names`: zero is the constraint's guarantee."""
    weights = dict(model.named_parameters())
    return max(
        ((weights[name].detach() - initial[name]) @ subspace.basis_for(name.removesuffix(".weight")))
        .abs()
        .max()
        .item()
        for name in names
    )
