"""Null-space safety GRPO with the offline rule-based refusal reward (`harmful` column labels prompts).

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/grpo.py \
        --config recipes/configs/qwen2.5-0.5b-instruct_grpo.yaml
"""

from trl import get_peft_config

from trl_nullspace import NullSpaceGRPOConfig, NullSpaceGRPOTrainer
from trl_nullspace.recipe_utils import load_model_and_tokenizer, load_train_dataset, parse_recipe_arguments
from trl_nullspace.rewards import refusal_reward

if __name__ == "__main__":
    script_args, training_args, model_args = parse_recipe_arguments(NullSpaceGRPOConfig)
    model, tokenizer = load_model_and_tokenizer(model_args)
    trainer = NullSpaceGRPOTrainer(
        model=model,
        reward_funcs=refusal_reward,
        args=training_args,
        train_dataset=load_train_dataset(script_args),
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
