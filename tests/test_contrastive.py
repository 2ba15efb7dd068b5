"""The contrastive rule (`nullspace_contrastive`): it frees, within the same budget of reference energy, the
directions its contrast data uses most; the contrast data is the training data or, with
`contrast_dataset=`/`nullspace_contrast_dataset`, data the user names (e.g. harmful prompts only), and a
cache serves only runs that contrast with the same data."""

from __future__ import annotations

import copy

import datasets
import pytest
import torch

from tests.conftest import training_kwargs
from tests.test_preservation import _largest_change_in_subspace
from trl_nullspace import NullSpaceSFTConfig, NullSpaceSFTTrainer
from trl_nullspace.data import toy
from trl_nullspace.estimation.activation import contrastive_basis, estimate_activation_subspace
from trl_nullspace.estimation.rank import RankSelection
from trl_nullspace.estimation.reference import tokenize_reference
from trl_nullspace.projection.targets import find_target_linears
from trl_nullspace.storage.cache import CacheMismatchError


def test_contrastive_basis_frees_the_contrast_heavy_direction_within_the_energy_budget():
    """Reference energy 100, 10, 1, 0.1, 0.01, 0.001 along the axes; the contrast data lives on the third
    axis. The energy rule (0.99) would free the three weakest axes; the contrastive rule frees the third,
    whose reference energy (0.9%) fits the same 1% budget, and protects everything else."""
    reference = torch.diag(torch.tensor([100.0, 10, 1, 0.1, 0.01, 0.001], dtype=torch.float64))
    contrast = torch.diag(torch.tensor([1.0, 1, 50, 0, 0, 0], dtype=torch.float64)) + 1e-6 * torch.eye(6)
    basis, kept = contrastive_basis(reference, contrast, RankSelection(energy=0.99))
    assert basis.shape == (6, 5)
    assert torch.allclose(basis.T @ basis, torch.eye(5), atol=1e-5)
    third = torch.zeros(6)
    third[2] = 1.0
    assert (basis.T @ third).abs().max() < 1e-4  # the contrast's direction is free
    assert kept == pytest.approx(1 - 1 / reference.trace().item(), abs=1e-6) and kept >= 0.99


def _harmful_prompts() -> datasets.Dataset:
    """The toy safety data's harmful requests alone, as prompts (prompt tokens only)."""
    split = toy.safety_split(seed=0)
    return datasets.Dataset.from_dict(
        {"prompt": [example.prompt for example in split["train"] if example.completion == toy.REFUSAL]}
    )


def _reference() -> datasets.Dataset:
    return datasets.Dataset.from_dict(toy.as_text(toy.general_examples(40, seed=1)))


def _trainer(model, tokenizer, safety_dataset, tmp_path, contrast_dataset=None, **overrides) -> NullSpaceSFTTrainer:
    settings = {"nullspace_contrastive": True, "nullspace_energy": 0.9, "max_steps": 8, **overrides}
    return NullSpaceSFTTrainer(
        model=model,
        args=NullSpaceSFTConfig(**training_kwargs(tmp_path, **settings)),
        train_dataset=safety_dataset,
        processing_class=tokenizer,
        reference_dataset=_reference(),
        contrast_dataset=contrast_dataset,
    )


def test_a_harm_only_contrast_shapes_the_bases_and_the_constraint_holds(model, tokenizer, safety_dataset, tmp_path):
    """With `contrast_dataset=` (harmful prompts alone) the bases are the contrastive rule's of the reference
    and *those prompts'* inputs, not the training data's; training then stays out of the bases it chose."""
    initial = copy.deepcopy(model.state_dict())
    untouched = copy.deepcopy(model)
    training_data = _trainer(copy.deepcopy(model), tokenizer, safety_dataset, tmp_path / "whole").nullspace_subspace
    trainer = _trainer(model, tokenizer, safety_dataset, tmp_path / "harm", contrast_dataset=_harmful_prompts())
    harm_only = trainer.nullspace_subspace
    args = trainer.args

    def batches(dataset: datasets.Dataset):
        size, length = args.nullspace_reference_batch_size, args.nullspace_reference_max_length
        return tokenize_reference(dataset, tokenizer, size, length, args.nullspace_reference_num_samples)

    expected = estimate_activation_subspace(
        untouched,
        batches(_reference()),
        find_target_linears(untouched),
        RankSelection(energy=0.9),
        show_progress=False,
        normalize_tokens=True,
        contrast_batches=batches(_harmful_prompts()),
    )
    assert harm_only.bases.keys() == expected.bases.keys()
    for key, basis in expected.bases.items():
        assert torch.allclose(harm_only.bases[key], basis, atol=1e-5), key
        assert harm_only.energy_kept(key) >= 0.9 - 1e-6, key
    assert any(
        harm_only.bases[key].shape != basis.shape or not torch.allclose(harm_only.bases[key], basis, atol=1e-3)
        for key, basis in training_data.bases.items()
    )
    names = [item.name for item in trainer.nullspace_projector.constrained]
    trainer.train()
    assert _largest_change_in_subspace(trainer.model, initial, harm_only, names) < 1e-4


def test_a_contrastive_cache_serves_only_runs_that_contrast_with_the_same_data(
    model, tokenizer, safety_dataset, tmp_path
):
    cache = str(tmp_path / "subspace.safetensors")

    def trainer(contrast_dataset):
        return _trainer(
            copy.deepcopy(model), tokenizer, safety_dataset, tmp_path, contrast_dataset, nullspace_cache_path=cache
        )

    written = trainer(_harmful_prompts()).nullspace_subspace
    loaded = trainer(_harmful_prompts()).nullspace_subspace
    assert all(torch.equal(written.bases[key], loaded.bases[key]) for key in written.bases)
    with pytest.raises(CacheMismatchError, match="other contrast data"):
        trainer(None)  # the training data instead


def test_contrast_data_without_the_contrastive_rule_is_refused(model, tokenizer, safety_dataset, tmp_path):
    with pytest.raises(ValueError, match="set nullspace_contrastive=True"):
        NullSpaceSFTConfig(**training_kwargs(tmp_path, nullspace_contrast_dataset="prompts.jsonl"))
    with pytest.raises(ValueError, match="set nullspace_contrastive=True"):
        _trainer(model, tokenizer, safety_dataset, tmp_path, _harmful_prompts(), nullspace_contrastive=False)
