"""`backend_for`: the one place that decides, from the arguments and the accelerator, where the
constraint runs and how its storage options left unset are filled (`storage_choice`), and refuses what
that backend cannot honour before anything is estimated."""

from __future__ import annotations

from typing import Any

from torch import nn

from trl_nullspace.backends.base import ConstraintBackend
from trl_nullspace.backends.fsdp2 import FSDP2Backend
from trl_nullspace.backends.local import LocalBackend
from trl_nullspace.backends.storage_choice import choose_unset_storage
from trl_nullspace.backends.zero.backend import ZeroBackend
from trl_nullspace.config import NullSpaceArguments


def backend_for(args: NullSpaceArguments, accelerator: Any, model: nn.Module, trainer_name: str) -> ConstraintBackend:
    """DeepSpeed ZeRO, FSDP (2; 1 is refused) or one process/DDP, as the Trainer itself detects them
    (`Trainer.is_deepspeed_enabled`, `is_fsdp_enabled`), its unset storage options filled in `args`,
    checked against `args` and `model`."""
    state = accelerator.state
    if getattr(state, "deepspeed_plugin", None) is not None:
        backend: ConstraintBackend = ZeroBackend(args, accelerator)
    elif getattr(state, "fsdp_plugin", None) is not None:
        backend = FSDP2Backend(args, accelerator)
    else:
        backend = LocalBackend(args, accelerator)
    backend.chosen_storage = choose_unset_storage(args, backend.lean_storage_built)
    backend.check_supported(model, trainer_name)
    return backend
