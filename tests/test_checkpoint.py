"""Checkpoints carry the subspace and anchors; resuming continues exactly where the run stopped.

With `nullspace_refresh_steps`, the subspace in use at a checkpoint is not the one a fresh trainer
would estimate from the base model, so a resume that re-derived it would project differently.
"""

import os

import pytest
import torch

from tests.conftest import make_sft_trainer, training_kwargs
from trl_nullspace import NullSpaceSFTConfig, NullSpaceSFTTrainer, load_subspace
from trl_nullspace.data import toy
from trl_nullspace.training.source import CHECKPOINT_FILE

SETTINGS = dict(nullspace_energy=0.9, nullspace_refresh_steps=2)


def _trainer(tokenizer, safety_dataset, reference_dataset, tmp_path, nullspace=None, **overrides):
    return NullSpaceSFTTrainer(
        model=toy.build_tiny_qwen2(tokenizer, seed=0),
        args=NullSpaceSFTConfig(
            **training_kwargs(tmp_path, max_steps=6, save_strategy="steps", save_steps=3, **overrides),
            **SETTINGS,
            **(nullspace or {}),
        ),
        train_dataset=safety_dataset,
        processing_class=tokenizer,
        reference_dataset=reference_dataset,
    )


# Offloaded, anchors are kept in host memory as column blocks: saved whole, restored into blocks.
OFFLOADED = {"nullspace_offload": True, "nullspace_offload_block_mib": 2**-10}


# Step snapshots keep no anchors: a checkpoint has none, and the resumed run keeps the constraint from its weights.
STEP_SNAPSHOTS = {"nullspace_step_snapshot": True}


@pytest.mark.parametrize(
    "nullspace", [None, OFFLOADED, STEP_SNAPSHOTS], ids=["resident", "offloaded", "step snapshots"]
)
def test_resume_reproduces_the_uninterrupted_run(tokenizer, safety_dataset, reference_dataset, tmp_path, nullspace):
    full = _trainer(tokenizer, safety_dataset, reference_dataset, tmp_path, nullspace)
    full.train()
    checkpoint = os.path.join(str(tmp_path / "out"), "checkpoint-3")
    saved, header = load_subspace(os.path.join(checkpoint, CHECKPOINT_FILE))
    # update target: anchors travel with the checkpoint, unless step snapshots replace them
    assert bool(header["anchors"]) == (nullspace is not STEP_SNAPSHOTS)

    resumed = _trainer(tokenizer, safety_dataset, reference_dataset, tmp_path / "resumed", nullspace)
    fresh_bases = {key: basis.clone() for key, basis in resumed.nullspace_subspace.bases.items()}
    assert any(  # the checkpoint's (refreshed) subspace differs from a fresh estimate: the test can fail
        fresh_bases[key].shape != basis.shape or not torch.allclose(fresh_bases[key], basis, atol=1e-4)
        for key, basis in saved.bases.items()
    )
    resumed.train(resume_from_checkpoint=checkpoint)
    final = dict(full.model.named_parameters())
    for name, parameter in resumed.model.named_parameters():
        assert torch.allclose(parameter, final[name], atol=1e-5), name


def test_a_step_snapshot_checkpoint_resumed_with_anchors_is_refused(
    tokenizer, safety_dataset, reference_dataset, tmp_path
):
    """A checkpoint saved with `nullspace_step_snapshot` has no anchors: resuming it with anchors expected names the
    setting instead of failing on a name mismatch."""
    _trainer(tokenizer, safety_dataset, reference_dataset, tmp_path, STEP_SNAPSHOTS).train()
    resumed = _trainer(tokenizer, safety_dataset, reference_dataset, tmp_path / "resumed")
    with pytest.raises(ValueError, match="holds no anchors.*nullspace_step_snapshot"):
        resumed.train(resume_from_checkpoint=os.path.join(str(tmp_path / "out"), "checkpoint-3"))


def test_resume_from_a_checkpoint_without_subspace_is_refused(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path
):
    trainer = make_sft_trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset, nullspace_energy=0.9)
    checkpoint = tmp_path / "plain-checkpoint"
    checkpoint.mkdir()
    model.save_pretrained(str(checkpoint))
    with pytest.raises(FileNotFoundError, match="not written by a null-space trainer"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def _moe_trainer(trainer_class, config_class, tokenizer, safety_dataset, reference_dataset, output):
    from tests.test_architectures import MIXTURE_OF_EXPERTS, build

    extra = {"reference_dataset": reference_dataset} if trainer_class is NullSpaceSFTTrainer else {}
    return trainer_class(
        model=build("qwen3_moe", tokenizer, MIXTURE_OF_EXPERTS["qwen3_moe"]),
        args=config_class(**training_kwargs(output, max_steps=6, save_strategy="steps", save_steps=3)),
        train_dataset=safety_dataset,
        processing_class=tokenizer,
        **extra,
    )


def _resume_gap(trainer_class, config_class, tokenizer, safety_dataset, reference_dataset, tmp_path) -> float:
    """Largest weight difference between a run of 6 steps and the same run resumed at step 3."""
    full = _moe_trainer(trainer_class, config_class, tokenizer, safety_dataset, reference_dataset, tmp_path)
    full.train()
    resumed = _moe_trainer(trainer_class, config_class, tokenizer, safety_dataset, reference_dataset, tmp_path / "r")
    resumed.train(resume_from_checkpoint=os.path.join(str(tmp_path / "out"), "checkpoint-3"))
    final = dict(full.model.named_parameters())
    return max((parameter - final[name]).abs().max().item() for name, parameter in resumed.model.named_parameters())


def test_a_mixture_of_experts_resume_restores_the_fused_experts(
    tokenizer, safety_dataset, reference_dataset, tmp_path
):
    """transformers saves Qwen3-MoE's fused experts one matrix per expert and the Trainer's resume
    skips them: plain TRL resumes from the initial experts (the control), the null-space trainer
    reloads them and reproduces the uninterrupted run."""
    from trl import SFTConfig, SFTTrainer

    plain = _resume_gap(SFTTrainer, SFTConfig, tokenizer, safety_dataset, reference_dataset, tmp_path / "plain")
    null_space = _resume_gap(
        NullSpaceSFTTrainer, NullSpaceSFTConfig, tokenizer, safety_dataset, reference_dataset, tmp_path / "ns"
    )
    assert plain > 1e-2, plain
    assert null_space < 1e-5, null_space


def test_checkpoints_share_one_copy_of_the_subspace(tokenizer, safety_dataset, reference_dataset, tmp_path):
    """Before, every checkpoint wrote the bases and anchors again (635 MB each for SmolLM2-135M). Now
    the run stores them once and each checkpoint's file is a hard link: one inode, one copy on disk;
    a checkpoint folder deleted (save_total_limit) or copied keeps a complete file."""
    trainer = NullSpaceSFTTrainer(
        model=toy.build_tiny_qwen2(tokenizer, seed=0),
        args=NullSpaceSFTConfig(
            **training_kwargs(tmp_path, max_steps=6, save_strategy="steps", save_steps=2, save_total_limit=2),
            nullspace_energy=0.9,
        ),
        train_dataset=safety_dataset,
        processing_class=tokenizer,
        reference_dataset=reference_dataset,
    )
    trainer.train()
    output = tmp_path / "out"
    files = [output / f"checkpoint-{step}" / CHECKPOINT_FILE for step in (4, 6)]
    assert not (output / "checkpoint-2").exists()  # rotated away; the others are complete without it
    stored = list((output / "nullspace_subspaces").iterdir())
    assert len(stored) == 1
    inodes = {os.stat(path).st_ino for path in [*files, stored[0]]}
    assert len(inodes) == 1 and os.stat(stored[0]).st_nlink == 3
    for path in files:
        subspace, header = load_subspace(str(path))
        assert header["anchors"] and subspace.bases.keys() == trainer.nullspace_subspace.bases.keys()
