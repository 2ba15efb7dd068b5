"""The learning rate a null-space step needs, scaled from what the projection removes.

Why: the safety data's gradient lies mostly inside the protected subspace (on SmolLM2-135M ~99% of
its norm, `nullspace/removed_frac`), so the allowed part ‖P g‖ is small and, to first order, a
normalised step along it lowers the loss ‖P g‖/‖g‖ times as much as plain TRL's step along g.
At the rate a TRL user already uses, the default therefore learns little (it needed 7.5× plain
TRL's rate for the same refusal, `docs/results/real_tuning.md`). `nullspace_scale_learning_rate`
multiplies the rate by ‖g‖/‖P g‖ measured on the first `CALIBRATION_STEPS` optimizer steps (a
running mean, then fixed), so the first-order loss decrease per step matches the unconstrained
step's. It changes the step's size, never its direction: every step is still projected, so the
constraint holds exactly as without it.

Cost: nothing beyond the gradient norms the projection computes anyway. The scale is applied to
the optimizer's and the scheduler's rates (`base_lrs`), so the scheduler's shape, the logged
`learning_rate` and a checkpoint's optimizer and scheduler all carry it; the calibration's own state
is saved beside them, so a resumed run neither scales twice nor forgets a half-done calibration.
"""

from __future__ import annotations

import math

import torch

from trl_nullspace.config import CALIBRATION_STEPS, MAX_SCALE, MEASURED_RATE_RATIO


def rate_note(learning_rate: float, scaled: bool) -> str:
    """The start summary's sentence on the learning rate: what a TRL user's rate will do here."""
    if scaled:
        return (
            f" Learning rate {learning_rate:g}, scaled by ‖g‖/‖P g‖ over the first {CALIBRATION_STEPS} steps "
            "(nullspace/lr_scale in the logs)."
        )
    return (
        f" Learning rate {learning_rate:g}, as given: the default needed {MEASURED_RATE_RATIO:g}x plain TRL's rate "
        "for plain TRL's refusal on SmolLM2-135M (docs/results/real_tuning.md); nullspace_scale_learning_rate=True "
        "scales the rate from what the projection keeps."
    )


class LearningRateScaler:
    """Scales the optimizer's rate by the mean of ‖g‖/‖P g‖ over the calibration steps.

    Invariant: after each `observe`, every param group's rate is its scheduled rate times `scale`.
    """

    def __init__(self) -> None:
        self.kept_fractions: list[float] = []

    @property
    def scale(self) -> float:
        """1 / mean(‖P g‖/‖g‖) over the steps observed so far, within [1, MAX_SCALE]; 1 before any."""
        if not self.kept_fractions:
            return 1.0
        mean_kept = sum(self.kept_fractions) / len(self.kept_fractions)
        return min(MAX_SCALE, max(1.0, 1.0 / max(mean_kept, 1.0 / MAX_SCALE)))

    def state_dict(self) -> dict[str, list[float]]:
        return {"kept_fractions": list(self.kept_fractions)}

    def load_state_dict(self, state: dict) -> None:
        """Resume where a checkpoint left off; its optimizer and scheduler already carry `scale`."""
        self.kept_fractions = [float(value) for value in state["kept_fractions"]]

    @property
    def calibrating(self) -> bool:
        return len(self.kept_fractions) < CALIBRATION_STEPS

    def observe(
        self,
        removed_fraction: float,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    ) -> None:
        """Fold one step's `removed_frac` (‖g − P g‖/‖g‖) into the scale and apply it before the step."""
        if not self.calibrating:
            return
        before = self.scale
        self.kept_fractions.append(math.sqrt(max(0.0, 1.0 - removed_fraction**2)))
        factor = self.scale / before
        for group in optimizer.param_groups:
            group["lr"] *= factor
        if scheduler is not None:
            # LambdaLR-style schedules recompute each rate from `base_lrs`; chained ones from the group's.
            scheduler.base_lrs = [rate * factor for rate in scheduler.base_lrs]
            # What the Trainer logs as `learning_rate` for this step; torch sets it the same way after each step.
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
