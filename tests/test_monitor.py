"""Live capability drift (`trl_nullspace.training.monitor`): logged while training, through the Trainer's log."""

import pytest
import torch
from trl import SFTConfig, SFTTrainer

from tests.conftest import training_kwargs
from trl_nullspace import NullSpaceSFTConfig, NullSpaceSFTTrainer
from trl_nullspace.data import toy
from trl_nullspace.estimation.reference import tokenize_reference
from trl_nullspace.training.monitor import CapabilityDriftMonitor


def _drift_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "nullspace/reference_kl" in entry]


def test_plain_trl_shows_drift_and_the_null_space_trainer_does_not(
    tokenizer, safety_dataset, reference_dataset, tmp_path
):
    """The same monitor on the same data: as a callback on TRL's SFTTrainer, and switched on by
    `monitor_dataset=` in the null-space trainer (strict threshold, so the reference data is kept)."""
    plain = SFTTrainer(
        model=toy.build_tiny_qwen2(tokenizer, seed=0),
        args=SFTConfig(**training_kwargs(tmp_path / "plain", logging_steps=4)),
        train_dataset=safety_dataset,
        processing_class=tokenizer,
    )
    batches = tokenize_reference(reference_dataset, tokenizer, batch_size=8, max_length=64)
    plain.add_callback(CapabilityDriftMonitor(plain, batches, steps=4))
    plain.train()
    null_space = NullSpaceSFTTrainer(
        model=toy.build_tiny_qwen2(tokenizer, seed=0),
        args=NullSpaceSFTConfig(
            **training_kwargs(tmp_path / "null", logging_steps=4), nullspace_eigenvalue_threshold=1e-10
        ),
        train_dataset=safety_dataset,
        processing_class=tokenizer,
        reference_dataset=reference_dataset,
        monitor_dataset=reference_dataset,
    )
    null_space.train()
    plain_logs, null_logs = _drift_logs(plain), _drift_logs(null_space)
    assert [entry["step"] for entry in plain_logs] == [entry["step"] for entry in null_logs] == [4, 8, 12]
    for trainer in (plain, null_space):  # the Trainer's own logs are all still there
        assert [entry["step"] for entry in trainer.state.log_history if "loss" in entry] == [4, 8, 12]
    assert plain_logs[-1]["nullspace/reference_kl"] > 1e-2
    assert max(entry["nullspace/reference_kl"] for entry in null_logs) < 1e-6
    assert null_logs[-1]["nullspace/reference_loss"] == pytest.approx(
        null_logs[0]["nullspace/reference_loss"], abs=1e-4
    )


def test_the_monitor_kl_is_zero_for_the_same_model_and_positive_after_a_change(tokenizer, reference_dataset, tmp_path):
    trainer = SFTTrainer(
        model=toy.build_tiny_qwen2(tokenizer, seed=0),
        args=SFTConfig(**training_kwargs(tmp_path)),
        train_dataset=reference_dataset,
        processing_class=tokenizer,
    )
    monitor = CapabilityDriftMonitor(trainer, tokenize_reference(reference_dataset, tokenizer, 8, 64), steps=1)
    monitor.on_train_begin(trainer.args, trainer.state, trainer.control)
    assert monitor.measure()["nullspace/reference_kl"] == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        trainer.model.lm_head.weight.mul_(1.5)
    assert monitor.measure()["nullspace/reference_kl"] > 1e-3


def test_the_monitor_is_off_unless_asked(model, tokenizer, safety_dataset, reference_dataset, tmp_path):
    trainer = NullSpaceSFTTrainer(
        model=model,
        args=NullSpaceSFTConfig(**training_kwargs(tmp_path), nullspace_energy=0.9),
        train_dataset=safety_dataset,
        processing_class=tokenizer,
        reference_dataset=reference_dataset,
    )
    assert not any(isinstance(callback, CapabilityDriftMonitor) for callback in trainer.callback_handler.callbacks)
