"""trl-nullspace: safety alignment with TRL trainers whose updates avoid a capability subspace."""

from trl_nullspace._version import __version__
from trl_nullspace.training.library_notices import quiet_library_notices  # noqa: E402

quiet_library_notices()  # before anything below imports DeepSpeed

from trl_nullspace.config import (  # noqa: E402
    NullSpaceArguments,
    NullSpaceDPOConfig,
    NullSpaceGRPOConfig,
    NullSpaceRLOOConfig,
    NullSpaceSFTConfig,
)
from trl_nullspace.estimation.rank import RankSelection  # noqa: E402
from trl_nullspace.estimation.subspace import CapabilitySubspace  # noqa: E402
from trl_nullspace.projection.projector import SubspaceProjector  # noqa: E402
from trl_nullspace.storage.cache import CacheMismatchError, load_subspace, save_subspace  # noqa: E402
from trl_nullspace.trainers import (  # noqa: E402
    NullSpaceDPOTrainer,
    NullSpaceGRPOTrainer,
    NullSpaceRLOOTrainer,
    NullSpaceSFTTrainer,
)

__all__ = [
    "CacheMismatchError",
    "CapabilitySubspace",
    "NullSpaceArguments",
    "NullSpaceDPOConfig",
    "NullSpaceDPOTrainer",
    "NullSpaceGRPOConfig",
    "NullSpaceGRPOTrainer",
    "NullSpaceRLOOConfig",
    "NullSpaceRLOOTrainer",
    "NullSpaceSFTConfig",
    "NullSpaceSFTTrainer",
    "RankSelection",
    "SubspaceProjector",
    "__version__",
    "load_subspace",
    "save_subspace",
]
