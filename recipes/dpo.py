"""Null-space safety DPO (run after sft.py, reusing its cached subspace).

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/dpo.py \
        --config recipes/configs/qwen2.5-0.5b-instruct_dpo.yaml
"""

from trl_nullspace import NullSpaceDPOConfig, NullSpaceDPOTrainer
from trl_nullspace.recipe_utils import run_recipe

if __name__ == "__main__":
    run_recipe(NullSpaceDPOTrainer, NullSpaceDPOConfig)
