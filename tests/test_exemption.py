"""The harm-keyed exemption (`nullspace_exempt_dataset`): which direction it frees, that the constraint
holds for the basis that remains while the update uses the freed key, and that it is stated and cached."""

from __future__ import annotations

import copy

import datasets
import pytest
import torch

from tests.conftest import make_sft_trainer, training_kwargs
from tests.test_preservation import _largest_change_in_subspace
from trl_nullspace import NullSpaceSFTConfig, NullSpaceSFTTrainer
from trl_nullspace.data import toy
from trl_nullspace.estimation.exemption import exempt_direction, harm_key
from trl_nullspace.storage.cache import CacheMismatchError


def test_exempt_direction_frees_exactly_the_keys_component_in_the_span():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(12, 8, dtype=torch.float64)).Q
    key = torch.randn(12, dtype=torch.float64)
    exempted = exempt_direction(basis, key)
    assert exempted.shape == (12, 7)
    assert torch.allclose(exempted.T @ exempted, torch.eye(7, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(basis @ (basis.T @ exempted), exempted, atol=1e-12)  # inside the old span
    in_span = basis @ (basis.T @ key)
    assert (exempted.T @ in_span).abs().max() < 1e-12  # the key's in-span part is no longer protected
    outside = torch.linalg.qr(torch.cat([basis, torch.randn(12, 1, dtype=torch.float64)], 1)).Q[:, -1]
    assert torch.equal(exempt_direction(basis, outside), basis)  # a key already free frees nothing


def test_harm_key_is_the_whitened_difference_of_means():
    torch.manual_seed(0)
    inputs = torch.randn(50, 6, dtype=torch.float64) * torch.tensor([3.0, 2, 1, 0.5, 0.1, 0.01], dtype=torch.float64)
    reference = inputs.T @ inputs
    harmful, benign = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    key = harm_key(reference, 50, harmful, benign, ridge=0.1)
    second = reference / 50
    mu = 0.1 * second.trace() / 6
    expected = torch.linalg.solve(second + mu * torch.eye(6, dtype=torch.float64), harmful - benign)
    assert torch.allclose(key, expected / expected.norm())
    with pytest.raises(ValueError, match="same mean"):
        harm_key(reference, 50, harmful, harmful, ridge=0.1)


def _exempt_dataset() -> datasets.Dataset:
    split = toy.safety_split(seed=0)
    harmful = [example.prompt for example in split["train"] if example.completion == toy.REFUSAL][:12]
    benign = [example.prompt for example in split["train"] if example.completion != toy.REFUSAL][:12]
    return datasets.Dataset.from_dict(
        {"prompt": harmful + benign, "harmful": [True] * len(harmful) + [False] * len(benign)}
    )


def _mlp_inputs(subspace) -> list[str]:
    return sorted(key for key in subspace.bases if key.endswith("mlp.gate_proj"))


def test_exemption_frees_one_mlp_direction_per_layer_and_training_uses_it(model, tokenizer, safety_dataset, tmp_path):
    """Each layer's gate/up input gives up one direction and nothing else changes; training then keeps
    every change orthogonal to the remaining basis (the guarantee, restated) while the MLP weights do
    move along the freed key, which the unexempted run never does."""
    reference = datasets.Dataset.from_dict(toy.as_text(toy.general_examples(40, seed=1)))
    settings = dict(nullspace_energy=0.999, max_steps=8)
    initial = copy.deepcopy(model.state_dict())
    plain_constraint = make_sft_trainer(
        copy.deepcopy(model), tokenizer, safety_dataset, tmp_path / "default", reference, **settings
    )
    trainer = NullSpaceSFTTrainer(
        model=model,
        args=NullSpaceSFTConfig(**training_kwargs(tmp_path / "exempt", **settings)),
        train_dataset=safety_dataset,
        processing_class=tokenizer,
        reference_dataset=reference,
        exempt_dataset=_exempt_dataset(),
    )
    exempted, default = trainer.nullspace_subspace, plain_constraint.nullspace_subspace
    mlp = _mlp_inputs(default)
    assert sorted(exempted.settings["exempted"]) == mlp == _mlp_inputs(exempted) and len(mlp) == 2
    for key, basis in default.bases.items():
        assert exempted.bases[key].shape[1] == basis.shape[1] - (key in mlp), key
        if key not in mlp:
            assert torch.equal(exempted.bases[key], basis)
        else:
            assert 0 < exempted.settings["exempted"][key] < 0.05  # the reference energy given up, stated
            assert exempted.energy_kept(key) < default.energy_kept(key)
    summary = trainer.nullspace_start_summary()
    assert "Harm keys exempted at 2 layer inputs" in summary
    names = [item.name for item in trainer.nullspace_projector.constrained]

    trainer.train()
    plain_constraint.train()
    assert _largest_change_in_subspace(trainer.model, initial, exempted, names) < 1e-4
    weights = dict(trainer.model.named_parameters())
    default_weights = dict(plain_constraint.model.named_parameters())
    for key in mlp:
        freed = default.bases[key] - exempted.bases[key] @ (exempted.bases[key].T @ default.bases[key])
        direction = torch.linalg.svd(freed, full_matrices=False).U[:, :1]  # the one freed direction
        for projection in ("gate_proj", "up_proj"):
            name = key.replace("gate_proj", projection) + ".weight"
            moved = ((weights[name].detach() - initial[name]) @ direction).abs().max().item()
            held = ((default_weights[name].detach() - initial[name]) @ direction).abs().max().item()
            assert moved > 1e-3 and held < 1e-4, (name, moved, held)


def test_a_cache_with_harm_keys_serves_only_runs_that_ask_for_the_same(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path
):
    cache = str(tmp_path / "subspace.safetensors")

    def trainer(exempt: bool, **overrides):
        return NullSpaceSFTTrainer(
            model=copy.deepcopy(model),
            args=NullSpaceSFTConfig(**training_kwargs(tmp_path, nullspace_cache_path=cache, **overrides)),
            train_dataset=safety_dataset,
            processing_class=tokenizer,
            reference_dataset=reference_dataset,
            exempt_dataset=_exempt_dataset() if exempt else None,
        )

    written = trainer(True).nullspace_subspace
    loaded = trainer(True).nullspace_subspace
    assert loaded.settings["exempted"] == written.settings["exempted"]
    with pytest.raises(CacheMismatchError, match="exemption"):
        trainer(False)
    with pytest.raises(CacheMismatchError, match="exemption"):
        trainer(True, nullspace_exempt_ridge=0.5)


def test_bad_exempt_data_is_refused_by_name(model, tokenizer, safety_dataset, reference_dataset, tmp_path):
    def trainer(exempt_dataset, **overrides):
        return NullSpaceSFTTrainer(
            model=copy.deepcopy(model),
            args=NullSpaceSFTConfig(**training_kwargs(tmp_path, **overrides)),
            train_dataset=safety_dataset,
            processing_class=tokenizer,
            reference_dataset=reference_dataset,
            exempt_dataset=exempt_dataset,
        )

    with pytest.raises(ValueError, match="boolean 'harmful' column"):
        trainer(datasets.Dataset.from_dict({"prompt": ["how do i make a bomb?"]}))
    with pytest.raises(ValueError, match="no harmful=True"):
        trainer(datasets.Dataset.from_dict({"prompt": ["bake a cake"], "harmful": [False]}))
    with pytest.raises(ValueError, match="nullspace_exempt_modules"):
        trainer(_exempt_dataset(), nullspace_exempt_modules=["c_fc"])
    with pytest.raises(ValueError, match="activation"):
        trainer(_exempt_dataset(), nullspace_method="gradient", nullspace_projection_target="gradient")
