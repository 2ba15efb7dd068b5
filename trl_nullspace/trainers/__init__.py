from trl_nullspace.trainers.dpo import NullSpaceDPOTrainer
from trl_nullspace.trainers.grpo import NullSpaceGRPOTrainer
from trl_nullspace.trainers.rloo import NullSpaceRLOOTrainer
from trl_nullspace.trainers.sft import NullSpaceSFTTrainer

__all__ = ["NullSpaceDPOTrainer", "NullSpaceGRPOTrainer", "NullSpaceRLOOTrainer", "NullSpaceSFTTrainer"]
