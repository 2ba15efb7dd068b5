"""`nullspace_scale_learning_rate`: the rate scaled by what the projection keeps, the constraint unchanged."""

import math
import os

import pytest
import torch

from tests.conftest import make_sft_trainer, train_and_measure
from trl_nullspace.data import toy
from trl_nullspace.training.constraint import RATE_SCALE_FILE
from trl_nullspace.training.learning_rate import CALIBRATION_STEPS, MAX_SCALE

STEPS = CALIBRATION_STEPS + 2  # the calibration, then steps at the fixed scale


def _logged(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def _expected_scales(removed_fractions: list[float]) -> list[float]:
    """The rule, restated: the running mean of ‖P g‖/‖g‖ over the calibration steps, inverted and capped."""
    kept = [math.sqrt(1 - fraction**2) for fraction in removed_fractions[:CALIBRATION_STEPS]]
    scales = [min(MAX_SCALE, max(1.0, index / sum(kept[:index]))) for index in range(1, len(kept) + 1)]
    return scales + [scales[-1]] * (len(removed_fractions) - len(scales))


def _fresh_trainer(tokenizer, safety_dataset, reference_dataset, folder, **settings):
    """A null-space SFT trainer on a new tiny Qwen2 (seed 0), so every run here starts from the same weights."""
    model = toy.build_tiny_qwen2(tokenizer, seed=0)
    return make_sft_trainer(model, tokenizer, safety_dataset, folder, reference_dataset, **settings)


def test_the_rate_is_scaled_by_what_the_projection_keeps_and_the_constraint_holds(
    tokenizer, safety_dataset, reference_dataset, tmp_path, capsys
):
    settings = dict(nullspace_eigenvalue_threshold=1e-10, max_steps=STEPS, learning_rate=1e-3)
    as_given = _fresh_trainer(tokenizer, safety_dataset, reference_dataset, tmp_path / "given", **settings)
    _, moved_as_given = train_and_measure(as_given)
    assert "as given: the default needed" in capsys.readouterr().out

    scaled_settings = dict(settings, nullspace_scale_learning_rate=True)
    scaled = _fresh_trainer(tokenizer, safety_dataset, reference_dataset, tmp_path / "scaled", **scaled_settings)
    drift, moved_scaled = train_and_measure(scaled)
    assert "scaled by ‖g‖/‖P g‖" in capsys.readouterr().out
    assert drift < 1e-4  # a bigger step, still in the null space: reference outputs do not move

    expected = _expected_scales(_logged(scaled, "nullspace/removed_frac"))
    assert expected[-1] > 1.2  # a share of the gradient is protected here, so the test can fail
    ratios = [s / g for s, g in zip(_logged(scaled, "learning_rate"), _logged(as_given, "learning_rate"), strict=True)]
    assert ratios == pytest.approx(expected, rel=1e-6)  # the scheduler's decay kept, times the scale
    assert _logged(scaled, "nullspace/lr_scale") == pytest.approx(expected, rel=1e-6)
    assert moved_scaled > 1.15 * moved_as_given  # the optimizer stepped at the scaled rate, not only the logs


def test_a_resume_inside_the_calibration_neither_scales_twice_nor_forgets(
    tokenizer, safety_dataset, reference_dataset, tmp_path
):
    settings = dict(
        nullspace_energy=0.9,
        nullspace_scale_learning_rate=True,
        max_steps=STEPS,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=4,
    )
    full = _fresh_trainer(tokenizer, safety_dataset, reference_dataset, tmp_path, **settings)
    full.train()
    checkpoint = os.path.join(str(tmp_path / "out"), "checkpoint-4")
    assert os.path.exists(os.path.join(checkpoint, RATE_SCALE_FILE))

    resumed = _fresh_trainer(tokenizer, safety_dataset, reference_dataset, tmp_path / "resumed", **settings)
    resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.nullspace.metrics.rate_scaler.scale == pytest.approx(
        full.nullspace.metrics.rate_scaler.scale, rel=1e-6
    )
    final = dict(full.model.named_parameters())
    for name, parameter in resumed.model.named_parameters():
        assert torch.allclose(parameter, final[name], atol=1e-5), name
