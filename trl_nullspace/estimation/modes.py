"""`evaluating(model)`: eval mode for a measurement inside training, the caller's mode restored.

Subspace estimation, the cache check, the drift monitor and the evaluations all run forward passes
on a model a trainer may be training; dropout must be off for them, and the trainer's mode must
come back even when the measurement raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
