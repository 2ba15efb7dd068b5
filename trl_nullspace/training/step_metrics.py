"""`StepMetrics`: what the constraint measures at each optimizer step, until the Trainer logs it.

The backend's moments return what they measured (the gradient's share removed, the norm of the
update's share removed); this keeps the values per step as device tensors or floats, reads them
only when the Trainer logs (`drain`: one `nullspace/<name>` mean each), and feeds the
learning-rate scale (`nullspace_scale_learning_rate`) its observations. A gradient's share is
measured only on steps that will be logged or while the scale calibrates (`wants_measurement`),
because measuring costs one extra pass over the constrained gradients.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from trl_nullspace.projection.constrained import ProjectionStats
from trl_nullspace.training.learning_rate import LearningRateScaler


class StepMetrics:
    """Per-step values since the last log, and the learning-rate scale when it is on."""

    def __init__(self, scale_learning_rate: bool, per_layer: bool):
        self.rate_scaler = LearningRateScaler() if scale_learning_rate else None
        self.per_layer = per_layer
        self._values: dict[str, list[float | torch.Tensor]] = defaultdict(list)

    def wants_measurement(self, step_will_be_logged: bool) -> bool:
        return step_will_be_logged or (self.rate_scaler is not None and self.rate_scaler.calibrating)

    def observe_gradient(
        self,
        stats: ProjectionStats,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    ) -> None:
        """The gradient moment's measurement: logged, and (scale on) the learning rate follows it."""
        self._values["removed_frac"].append(stats.removed_fraction)
        if self.rate_scaler is not None:
            self.rate_scaler.observe(stats.removed_fraction, optimizer, scheduler)
            self._values["lr_scale"].append(self.rate_scaler.scale)
        if self.per_layer:
            for name, fraction in stats.per_parameter_fractions().items():
                self._values[f"removed_frac/{name}"].append(fraction)

    def observe_update(self, removed_norm: float | torch.Tensor) -> None:
        self._values["update_removed_norm"].append(removed_norm)

    def drain(self) -> dict[str, float]:
        """The mean of each value since the last call, as `nullspace/<name>`; then forgets them."""
        logs = {f"nullspace/{key}": float(sum(values) / len(values)) for key, values in self._values.items()}
        self._values.clear()
        return logs
