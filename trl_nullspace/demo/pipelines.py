"""The demo's training pipelines: SFT, SFT→DPO and SFT→GRPO, each in a plain and a null-space form.

Every stage of a null-space pipeline uses the one subspace estimated from the base model and cached
by the first stage; later stages reuse the cache on the model the earlier stage trained.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import datasets
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

from trl_nullspace import (
    NullSpaceDPOConfig,
    NullSpaceDPOTrainer,
    NullSpaceGRPOConfig,
    NullSpaceGRPOTrainer,
    NullSpaceSFTConfig,
    NullSpaceSFTTrainer,
)
from trl_nullspace.data import toy
from trl_nullspace.rewards import refusal_reward
from trl_nullspace.training.progress import quiet_progress


@dataclass
class Stage:
    """One training stage: the plain TRL pair, its null-space pair, data and stage-specific settings."""

    plain: tuple[type, type]
    null_space: tuple[type, type]
    dataset: datasets.Dataset
    arguments: dict
    trainer_kwargs: Callable[[object], dict] = field(default=lambda model: {})


def common_training_arguments(seed: int) -> dict:
    """Shared by every stage and variant: AdamW with weight decay, fp32 on CPU, no checkpoints."""
    return dict(
        per_device_train_batch_size=8,
        weight_decay=0.1,
        lr_scheduler_type="constant",
        report_to="none",
        save_strategy="no",
        logging_steps=10,
        use_cpu=True,
        bf16=False,
        seed=seed,
    )


def build_pipeline(name: str, train_examples: list[toy.Example], quick: bool) -> list[Stage]:
    """Stages of the `sft`, `dpo` (SFT→DPO) or `grpo` (SFT→GRPO) demo."""
    sft_data = datasets.Dataset.from_dict(toy.as_prompt_completion(train_examples))
    sft = Stage(
        plain=(SFTTrainer, SFTConfig),
        null_space=(NullSpaceSFTTrainer, NullSpaceSFTConfig),
        dataset=sft_data,
        arguments={
            "num_train_epochs": (10 if quick else 40) if name == "sft" else (10 if quick else 25),
            "learning_rate": 3e-3,
        },
    )
    if name == "sft":
        return [sft]
    if name == "dpo":
        dpo = Stage(
            plain=(DPOTrainer, DPOConfig),
            null_space=(NullSpaceDPOTrainer, NullSpaceDPOConfig),
            dataset=datasets.Dataset.from_dict(toy.as_preference_pairs(train_examples)),
            # Pure DPO at lr 1e-4 over-optimised the margin here: it pushed the chosen refusal down
            # along with the rejected answer (likelihood displacement) until greedy answers to
            # harmful prompts degenerated ("i therei how."; refusal 31% null-space, 75% plain). A
            # smaller rate and TRL's NLL term on the chosen answer ("sft", as in RPO) keep it at 100%.
            arguments={
                "num_train_epochs": 3 if quick else 10,
                "learning_rate": 3e-5,
                "beta": 0.1,
                "loss_type": ["sigmoid", "sft"],
            },
            trainer_kwargs=lambda model: {"ref_model": copy.deepcopy(model)},
        )
        return [sft, dpo]
    if name == "grpo":
        grpo = Stage(
            plain=(GRPOTrainer, GRPOConfig),
            null_space=(NullSpaceGRPOTrainer, NullSpaceGRPOConfig),
            dataset=datasets.Dataset.from_dict(toy.as_labelled_prompts(train_examples)),
            arguments={
                "max_steps": 10 if quick else 60,
                "learning_rate": 1e-4,
                "num_generations": 4,
                "max_completion_length": len(toy.REFUSAL) + 2,
                "beta": 0.0,
            },
            trainer_kwargs=lambda model: {"reward_funcs": refusal_reward},
        )
        return [sft, grpo]
    raise ValueError(f"Unknown demo pipeline {name!r}; choose sft, dpo or grpo.")


def run_pipeline(
    stages: list[Stage],
    model,
    tokenizer,
    null_space: bool,
    reference: datasets.Dataset,
    output_dir: str,
    seed: int,
    after_stage: Callable[[int, object], None],
):
    """Train `model` through every stage, calling `after_stage(index, model)` after each."""
    cache_path = os.path.join(output_dir, "subspace.safetensors")
    if null_space and os.path.exists(cache_path):
        os.remove(cache_path)  # estimated afresh from this run's base model
    for index, stage in enumerate(stages):
        trainer_class, config_class = stage.null_space if null_space else stage.plain
        arguments = {
            **common_training_arguments(seed),
            **stage.arguments,
            "output_dir": os.path.join(output_dir, f"stage{index}-{trainer_class.__name__}"),
        }
        extra = stage.trainer_kwargs(model)
        if null_space:
            arguments.update(
                nullspace_energy=0.99,
                nullspace_cache_path=cache_path,
                nullspace_cache_match_weights=index == 0,  # later stages start from the earlier stage's model
            )
            extra["reference_dataset"] = reference
        trainer = trainer_class(
            model=model,
            args=config_class(**arguments),
            train_dataset=stage.dataset,
            processing_class=tokenizer,
            **extra,
        )
        quiet_progress(trainer)  # one bar per stage; the logs stay in trainer.state.log_history
        trainer.train()
        model = trainer.model
        # TRL's SFTTrainer patched `forward` with a closure over this model: a deep copy (the next
        # stage's DPO ref_model) would run this model's layers, i.e. the policy being trained.
        vars(model).pop("forward", None)
        after_stage(index, model)
