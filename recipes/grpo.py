"""Null-space safety GRPO with the offline rule-based refusal reward (`harmful` column labels prompts).

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/grpo.py \
        --config recipes/configs/qwen2.5-0.5b-instruct_grpo.yaml
"""

from trl_nullspace import NullSpaceGRPOConfig, NullSpaceGRPOTrainer
from trl_nullspace.recipe_utils import run_recipe
from trl_nullspace.rewards import refusal_reward

if __name__ == "__main__":
    run_recipe(NullSpaceGRPOTrainer, NullSpaceGRPOConfig, reward_funcs=refusal_reward)
