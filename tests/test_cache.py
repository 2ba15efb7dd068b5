"""Subspace cache: round trip without re-estimation, and clear errors for the wrong model or data."""

import datasets
import pytest
import torch

from tests.conftest import make_sft_trainer
from trl_nullspace import CacheMismatchError, load_subspace
from trl_nullspace.data import toy
from trl_nullspace.training.source import SubspaceSource


def _trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset=None, **nullspace):
    nullspace.setdefault("nullspace_cache_path", str(tmp_path / "subspace.safetensors"))
    return make_sft_trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset, **nullspace)


def test_cache_round_trip_reuses_the_subspace_without_estimating(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path, monkeypatch
):
    first = _trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset)
    cache = tmp_path / "subspace.safetensors"
    assert cache.exists()
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []  # atomic write left nothing behind
    loaded, header = load_subspace(str(cache))
    assert header["model_name"] == model.config._name_or_path
    assert header["method"] == "activation" and "weights_fingerprint" in header

    def fail(self):
        raise AssertionError("estimated again although a matching cache exists")

    monkeypatch.setattr(SubspaceSource, "estimate", fail)
    fresh_model = toy.build_tiny_qwen2(tokenizer, seed=0)  # same weights as `model`
    second = _trainer(fresh_model, tokenizer, safety_dataset, tmp_path)  # no reference data needed
    assert second.nullspace_subspace.targets == first.nullspace_subspace.targets
    for key, basis in first.nullspace_subspace.bases.items():
        assert (second.nullspace_subspace.bases[key] == basis.cpu()).all()
        assert (loaded.bases[key] == basis.cpu()).all()


def test_cache_from_other_weights_is_refused(model, tokenizer, safety_dataset, reference_dataset, tmp_path):
    _trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset)
    other_weights = toy.build_tiny_qwen2(tokenizer, seed=1)
    with pytest.raises(CacheMismatchError, match="weights_fingerprint.*different weights"):
        _trainer(other_weights, tokenizer, safety_dataset, tmp_path)


def test_cache_from_other_architecture_is_refused(model, tokenizer, safety_dataset, reference_dataset, tmp_path):
    _trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset)
    wider = toy.build_tiny_qwen2(tokenizer, hidden_size=32, seed=0)
    with pytest.raises(CacheMismatchError, match="architecture_fingerprint.*different architecture"):
        _trainer(wider, tokenizer, safety_dataset, tmp_path)


def test_cache_with_other_settings_or_data_is_refused(model, tokenizer, safety_dataset, reference_dataset, tmp_path):
    _trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset)
    with pytest.raises(CacheMismatchError, match="method: cache has 'activation'"):
        _trainer(model, tokenizer, safety_dataset, tmp_path, nullspace_method="gradient")
    with pytest.raises(CacheMismatchError, match="rank_selection"):
        _trainer(model, tokenizer, safety_dataset, tmp_path, nullspace_energy=0.5)
    other_data = datasets.Dataset.from_dict(toy.as_text(toy.general_examples(3, seed=7)))
    with pytest.raises(CacheMismatchError, match="different reference data"):
        _trainer(model, tokenizer, safety_dataset, tmp_path, other_data)


def test_non_cache_safetensors_file_is_refused(model, tokenizer, safety_dataset, tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "subspace.safetensors"))
    with pytest.raises(CacheMismatchError, match="not a trl-nullspace subspace cache"):
        _trainer(model, tokenizer, safety_dataset, tmp_path)


def test_an_interrupted_cache_write_keeps_the_previous_cache(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path, monkeypatch
):
    """Killed mid-write (here: the write raises), the old cache stays valid and no partial file remains."""
    import trl_nullspace.storage.cache as cache_module

    path = tmp_path / "subspace.safetensors"
    trainer = make_sft_trainer(
        model,
        tokenizer,
        safety_dataset,
        tmp_path,
        reference_dataset,
        nullspace_energy=0.9,
        nullspace_cache_path=str(path),
    )
    before = path.read_bytes()

    def interrupted(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache_module.save_subspace(str(path), trainer.nullspace_subspace, {"model_name": "x"})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []
    load_subspace(str(path))  # still a valid cache


def _reuse_after(first_stage_trainer, tokenizer, safety_dataset, reference_dataset, tmp_path):
    """A second null-space stage on the first stage's model, reusing the base model's cache."""
    return _trainer(
        first_stage_trainer.model,
        tokenizer,
        safety_dataset,
        tmp_path,
        reference_dataset,
        nullspace_cache_match_weights=False,
        nullspace_eigenvalue_threshold=1e-10,
    )


@pytest.mark.parametrize("plain_stage", [{}, {"learning_rate": 1e-4, "max_steps": 3}], ids=["long", "gentle"])
def test_a_reused_cache_that_no_longer_holds_the_reference_inputs_is_refused(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path, plain_stage
):
    """After a stage trained WITHOUT the constraint, the base model's cache no longer describes the
    model (the reference inputs moved out of its span); reusing it would silently stop protecting.
    The gentle stage leaves the strict cache missing only 2e-3 of the reference energy, which a
    tolerance of 10% in absolute terms accepted, and the next stage then moved the logits by 0.6."""
    from trl import SFTConfig, SFTTrainer

    from tests.conftest import training_kwargs

    _trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset, nullspace_eigenvalue_threshold=1e-10)
    plain = SFTTrainer(
        model=model,
        args=SFTConfig(**training_kwargs(tmp_path, **plain_stage)),
        train_dataset=safety_dataset,
        processing_class=tokenizer,
    )
    plain.train()
    pattern = r"(?s)no longer describes.*misses .* of the reference energy \(left out at estimation: .*Re-estimate"
    with pytest.raises(CacheMismatchError, match=pattern):
        _reuse_after(plain, tokenizer, safety_dataset, reference_dataset, tmp_path)


def test_a_reused_cache_after_a_constrained_stage_is_accepted(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path
):
    from tests.conftest import logits_on

    first = _trainer(
        model, tokenizer, safety_dataset, tmp_path, reference_dataset, nullspace_eigenvalue_threshold=1e-10
    )
    first.train()
    second = _reuse_after(first, tokenizer, safety_dataset, reference_dataset, tmp_path)
    before = logits_on(second.model, second.nullspace.source.reference_batches)
    second.train()
    assert (logits_on(second.model, second.nullspace.source.reference_batches) - before).abs().max().item() < 1e-4


def test_a_reused_cache_without_reference_data_is_refused(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path
):
    _trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset)
    other_weights = toy.build_tiny_qwen2(tokenizer, seed=1)
    with pytest.raises(CacheMismatchError, match="pass the reference data too"):
        _trainer(other_weights, tokenizer, safety_dataset, tmp_path, nullspace_cache_match_weights=False)


def test_a_truncated_cache_names_the_file_and_the_fix(model, tokenizer, safety_dataset, reference_dataset, tmp_path):
    _trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset)
    path = tmp_path / "subspace.safetensors"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(
        CacheMismatchError, match=r"subspace.safetensors is not a readable safetensors file.*Delete it"
    ):
        _trainer(model, tokenizer, safety_dataset, tmp_path)


def _damage(path, how: str) -> None:
    """Damage the tensor data after the safetensors header (8-byte length, then the JSON)."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    if how == "zeroed":
        middle = start + (len(data) - start) // 2
        data[middle : middle + 4096] = bytes(4096)
    else:
        generator = torch.Generator().manual_seed(0)
        for offset in torch.randint(start, len(data), (64,), generator=generator).tolist():
            data[offset] ^= 1 << int(torch.randint(0, 8, (1,), generator=generator))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["zeroed", "bit flips"])
def test_a_damaged_cache_is_refused_by_its_checksum(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path, how
):
    """4 KiB zeroed once trained on with 0.144 drift; 64 flipped bits gave a NaN error blaming the weights."""
    _trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset)
    path = tmp_path / "subspace.safetensors"
    _damage(path, how)
    with pytest.raises(CacheMismatchError, match=r"do not match the checksum written with them.*Delete it"):
        _trainer(model, tokenizer, safety_dataset, tmp_path)


def test_a_cache_whose_basis_is_not_orthonormal_is_refused(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path
):
    from trl_nullspace.storage import cache as cache_module

    trainer = _trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset)
    subspace, header = load_subspace(str(tmp_path / "subspace.safetensors"))
    key = next(key for key, basis in subspace.bases.items() if basis.shape[1] > 1)
    subspace.bases[key] = subspace.bases[key] * 1.01  # a valid checksum over a wrong basis
    path = tmp_path / "bent.safetensors"
    cache_module.save_subspace(str(path), subspace, {"model_name": header["model_name"]})
    with pytest.raises(CacheMismatchError, match=rf"the basis of {key} is not orthonormal"):
        load_subspace(str(path))
    assert trainer.nullspace_subspace.bases  # the trainer's own cache loads
    load_subspace(str(tmp_path / "subspace.safetensors"))


def test_overwrite_re_estimates_and_replaces_a_cache_that_does_not_fit(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path, caplog
):
    """Without the option, another setting on the same path is refused (and the message names the option);
    with it, the run re-estimates, says why, and the file then serves the new setting."""
    path = tmp_path / "subspace.safetensors"
    _trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset, nullspace_energy=0.9)
    with pytest.raises(CacheMismatchError, match="nullspace_cache_overwrite=True"):
        _trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset, nullspace_energy=0.95)
    with caplog.at_level("WARNING", logger="transformers"):
        second = _trainer(
            model,
            tokenizer,
            safety_dataset,
            tmp_path,
            reference_dataset,
            nullspace_energy=0.95,
            nullspace_cache_overwrite=True,
        )
    assert "re-estimating and replacing" in caplog.text and "rank_selection" in caplog.text
    assert load_subspace(str(path))[1]["rank_selection"]["energy"] == 0.95
    third = _trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset, nullspace_energy=0.95)
    assert {key: basis.shape for key, basis in third.nullspace_subspace.bases.items()} == {
        key: basis.shape for key, basis in second.nullspace_subspace.bases.items()
    }


def test_a_cache_folder_keeps_one_file_per_setting(model, tokenizer, safety_dataset, reference_dataset, tmp_path):
    folder = tmp_path / "caches"
    folder.mkdir()

    def trainer_at(energy):
        return _trainer(
            model,
            tokenizer,
            safety_dataset,
            tmp_path,
            reference_dataset,
            nullspace_cache_path=str(folder),
            nullspace_energy=energy,
        )

    first, second = trainer_at(0.9), trainer_at(0.95)
    files = sorted(path.name for path in folder.iterdir())
    assert len(files) == 2 and all(name.startswith(model.config._name_or_path) for name in files), files
    assert first.nullspace_settings()["cache_path"] != second.nullspace_settings()["cache_path"]
    assert trainer_at(0.9).nullspace.source.cache_file == first.nullspace.source.cache_file
    assert sorted(path.name for path in folder.iterdir()) == files  # loaded, not written again


def test_the_checksum_takes_single_column_bases_of_any_stride():
    """A rank-1 basis sliced from a wider one is "contiguous" with a last-dimension stride other than 1
    (the gradient method under ZeRO-3 made one); the checksum once refused to view its bytes."""
    from trl_nullspace.storage.cache import tensors_checksum

    wide = torch.randn(5, 3)
    column = wide[:, :1].t().contiguous().t()  # shape (5, 1), stride (1, 5)
    assert column.is_contiguous() and column.stride(-1) != 1
    assert tensors_checksum({"basis/x": column}) == tensors_checksum(
        {"basis/x": column.clone(memory_format=torch.contiguous_format).reshape(5, 1)}
    )
