"""`NullSpaceDPOTrainer`: TRL's `DPOTrainer` whose updates stay out of the capability subspace."""

from trl import DPOTrainer

from trl_nullspace.config import NullSpaceDPOConfig
from trl_nullspace.training.mixin import NullSpaceTrainerMixin


class NullSpaceDPOTrainer(NullSpaceTrainerMixin, DPOTrainer):
    """Drop-in for `trl.DPOTrainer`: same arguments, plus `reference_dataset=` and `NullSpaceDPOConfig`.

    Two different "references": `ref_model` is DPO's frozen reference *model* (its log-ratios anchor
    the DPO loss); `reference_dataset` is general-capability *data* whose outputs the null-space
    constraint preserves. A preference dataset with `chosen`/`rejected` columns also works as
    reference data (both responses are used).

    Example:
        trainer = NullSpaceDPOTrainer(
            model=sft_model, args=NullSpaceDPOConfig(output_dir="out"), train_dataset=safe_vs_unsafe_pairs,
            processing_class=tokenizer, reference_dataset=general_data,
        )
    """

    config_class = NullSpaceDPOConfig
