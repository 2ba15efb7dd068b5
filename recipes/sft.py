"""Null-space safety SFT.

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/sft.py \
        --config recipes/configs/qwen2.5-0.5b-instruct_sft.yaml
"""

from trl import get_peft_config

from trl_nullspace import NullSpaceSFTConfig, NullSpaceSFTTrainer
from trl_nullspace.recipe_utils import load_model_and_tokenizer, load_train_dataset, parse_recipe_arguments

if __name__ == "__main__":
    script_args, training_args, model_args = parse_recipe_arguments(NullSpaceSFTConfig)
    model, tokenizer = load_model_and_tokenizer(model_args)
    trainer = NullSpaceSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=load_train_dataset(script_args),
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
