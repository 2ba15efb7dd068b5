from trl_nullspace.trainers.sft import NullSpaceSFTTrainer

__all__ = ["NullSpaceSFTTrainer"]
