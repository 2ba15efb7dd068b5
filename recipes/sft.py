"""Null-space safety SFT.

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/sft.py \
        --config recipes/configs/qwen2.5-0.5b-instruct_sft.yaml
"""

from trl_nullspace import NullSpaceSFTConfig, NullSpaceSFTTrainer
from trl_nullspace.recipe_utils import run_recipe

if __name__ == "__main__":
    run_recipe(NullSpaceSFTTrainer, NullSpaceSFTConfig)
