"""Null-space safety DPO (run after sft.py, reusing its cached subspace).

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/dpo.py \
        --config recipes/configs/qwen2.5-0.5b-instruct_dpo.yaml
"""

from trl import get_peft_config

from trl_nullspace import NullSpaceDPOConfig, NullSpaceDPOTrainer
from trl_nullspace.recipe_utils import load_model_and_tokenizer, load_train_dataset, parse_recipe_arguments

if __name__ == "__main__":
    script_args, training_args, model_args = parse_recipe_arguments(NullSpaceDPOConfig)
    model, tokenizer = load_model_and_tokenizer(model_args)
    trainer = NullSpaceDPOTrainer(
        model=model,
        args=training_args,
        train_dataset=load_train_dataset(script_args),
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
