"""`NullSpaceRLOOTrainer`: TRL's `RLOOTrainer` whose updates stay out of the capability subspace."""

from trl import RLOOTrainer

from trl_nullspace.config import NullSpaceRLOOConfig
from trl_nullspace.training.mixin import NullSpaceTrainerMixin


class NullSpaceRLOOTrainer(NullSpaceTrainerMixin, RLOOTrainer):
    """Drop-in for `trl.RLOOTrainer`: same arguments, plus `reference_dataset=` and `NullSpaceRLOOConfig`."""

    config_class = NullSpaceRLOOConfig
