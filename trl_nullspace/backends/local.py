"""One process, or DDP: the projections on the whole weights and gradients every rank holds.

DDP all-reduces the gradients before the optimizer step, so every rank projects the same gradient
and the same update, and the weights stay identical across ranks with no communication of the
constraint's own. Cost per optimizer step: one gradient projection (`gradient`/`both` targets) and
one update projection (`update`/`both`), each `O(d_out · d_in · k)` per constrained weight.
"""

from __future__ import annotations

import torch
from torch import nn

from trl_nullspace.backends.base import ConstraintBackend
from trl_nullspace.projection.constrained import ProjectionStats
from trl_nullspace.storage.checkpoint_weights import reload_converted_weights


class LocalBackend(ConstraintBackend):
    """The projector run directly on the model's parameters (module docstring)."""

    name = "one process or DDP"
    optimizer_steps_module_parameters = True
    takes_step_snapshots = True
    low_precision_complements = True

    def begin_training(self, model: nn.Module) -> None:
        """Nothing to build: DDP's wrapper shares the parameters the projector was bound to."""

    def take_previous(self) -> None:
        self.projector.take_previous()

    def before_step(self, model: nn.Module, step: int, measure: bool) -> ProjectionStats | None:
        """Refuse non-finite gradients (projecting would spread them), then project them under the
        `gradient`/`both` targets; under `update` they are only measured, when `measure` asks."""
        self._check_finite(model, step)
        if not self.projects_gradients and not measure:
            return None
        return self.projector.gradient_stats(apply=self.projects_gradients)

    def _check_finite(self, model: nn.Module, step: int) -> None:
        nonfinite = self.projector.nonfinite_gradients()
        if not nonfinite or getattr(self.accelerator, "scaler", None) is not None:
            return  # a loss scaler skips the step itself
        poisoned = [name for name, parameter in model.named_parameters() if not parameter.isfinite().all()]
        if poisoned:  # the gradients only inherit it: name the cause, not the first symptom
            raise FloatingPointError(
                f"NaN or inf in the model's weights at optimizer step {step}, in "
                f"{poisoned[:3]}{' and more' if len(poisoned) > 3 else ''}: every gradient inherits it, so a "
                "lower learning rate will not help. Load the model from intact weights (a model loaded in "
                "float16 can overflow to inf: load it in bfloat16 or float32)."
            )
        raise FloatingPointError(
            f"NaN or inf gradients at optimizer step {step} in {nonfinite[:3]}: projecting "
            "them would spread the NaN. Lower the learning rate or check the batch; saved checkpoints are intact."
        )

    def after_step(self) -> torch.Tensor | None:
        return self.projector.enforce_anchors() if self.projects_updates else None

    def reload_converted_weights(self, model: nn.Module, checkpoint: str) -> list[str]:
        """Fused experts saved per expert (`storage.checkpoint_weights`): the Trainer's load skips them."""
        return reload_converted_weights(model, checkpoint)
