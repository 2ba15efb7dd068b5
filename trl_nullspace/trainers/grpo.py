"""`NullSpaceGRPOTrainer`: TRL's `GRPOTrainer` whose updates stay out of the capability subspace."""

from trl import GRPOTrainer

from trl_nullspace.config import NullSpaceGRPOConfig
from trl_nullspace.training.mixin import NullSpaceTrainerMixin


class NullSpaceGRPOTrainer(NullSpaceTrainerMixin, GRPOTrainer):
    """Drop-in for `trl.GRPOTrainer`: same arguments, plus `reference_dataset=` and `NullSpaceGRPOConfig`.

    Example (offline safety reward, see `trl_nullspace.rewards`):
        trainer = NullSpaceGRPOTrainer(
            model=model, reward_funcs=refusal_reward, args=NullSpaceGRPOConfig(output_dir="out"),
            train_dataset=prompts_with_harmful_column, processing_class=tokenizer, reference_dataset=general_data,
        )
    """

    config_class = NullSpaceGRPOConfig
