"""`NullSpaceSFTTrainer`: TRL's `SFTTrainer` whose updates stay out of the capability subspace."""

from trl import SFTTrainer

from trl_nullspace.config import NullSpaceSFTConfig
from trl_nullspace.training.mixin import NullSpaceTrainerMixin


class NullSpaceSFTTrainer(NullSpaceTrainerMixin, SFTTrainer):
    """Drop-in for `trl.SFTTrainer`: same arguments, plus `reference_dataset=` and `NullSpaceSFTConfig`.

    Example:
        trainer = NullSpaceSFTTrainer(
            model=model, args=NullSpaceSFTConfig(output_dir="out"), train_dataset=safety_data,
            processing_class=tokenizer, reference_dataset=general_data,
        )
        trainer.train()
    """

    config_class = NullSpaceSFTConfig
