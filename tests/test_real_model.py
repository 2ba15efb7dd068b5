"""The constraint on a real pretrained model (SmolLM2-135M-Instruct), not only on tiny random ones."""

import copy
import os
import subprocess
import sys

import datasets
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

from tests.conftest import logits_on, training_kwargs
from tests.real_model import HARMFUL, REPOSITORY, general_dataset, real_model_path, refusal_dataset
from trl_nullspace import NullSpaceGRPOConfig, NullSpaceGRPOTrainer, NullSpaceSFTConfig, NullSpaceSFTTrainer
from trl_nullspace.cli import main as cli_main
from trl_nullspace.data.loading import load_dataset_from
from trl_nullspace.estimation.activation import estimate_activation_subspace
from trl_nullspace.estimation.rank import RankSelection
from trl_nullspace.estimation.reference import tokenize_reference
from trl_nullspace.projection.targets import find_target_linears
from trl_nullspace.rewards import completion_text


@pytest.fixture(scope="module")
def smollm2():
    path = real_model_path()
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _arguments(tmp_path) -> dict:
    # A few steps at a rate that moves a real model visibly; TRL turns gradient checkpointing on by default.
    return training_kwargs(
        tmp_path,
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-4,
        max_length=64,
        gradient_checkpointing=False,
    )


def test_converted_model_is_an_ordinary_trainable_model(smollm2):
    model, tokenizer = smollm2
    assert getattr(model, "hf_quantizer", None) is None and "quantization_config" not in model.config.to_dict()
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"


def test_reference_outputs_stay_put_on_the_real_model_while_plain_trl_moves_them(smollm2, tmp_path):
    model, tokenizer = smollm2
    reference = tokenize_reference(general_dataset(), tokenizer, batch_size=4, max_length=64)
    before = logits_on(model, reference)

    trainer = NullSpaceSFTTrainer(
        model=copy.deepcopy(model),
        args=NullSpaceSFTConfig(**_arguments(tmp_path), nullspace_eigenvalue_threshold=1e-12),
        train_dataset=refusal_dataset(),
        processing_class=tokenizer,
        reference_dataset=general_dataset(),
    )
    trainer.train()
    null_space_drift = (logits_on(trainer.model, reference) - before).abs().max().item()
    moved = max(
        (item.parameter.detach() - model.get_parameter(item.name)).abs().max().item()
        for item in trainer.nullspace_projector.constrained
    )

    plain = SFTTrainer(
        model=copy.deepcopy(model),
        args=SFTConfig(**_arguments(tmp_path)),
        train_dataset=refusal_dataset(),
        processing_class=tokenizer,
    )
    plain.train()
    plain_drift = (logits_on(plain.model, reference) - before).abs().max().item()

    assert moved > 1e-4  # the null-space trainer did train
    assert plain_drift > 1.0  # logits are ~±40 here; plain TRL moves them by several units
    assert null_space_drift < 1e-3, null_space_drift  # fp32 round-off through 30 layers


def test_a_massive_activation_does_not_decide_the_rank(smollm2):
    """SmolLM2's layer-11 MLP output projection sees one token with a massive activation. On raw
    inputs that token holds nearly all the energy, so energy 0.99 keeps rank 1 and leaves every other
    direction the reference data uses unprotected; the default per-token normalisation does not."""
    model, tokenizer = smollm2
    reference = tokenize_reference(general_dataset(), tokenizer, batch_size=4, max_length=64)
    layer = "model.layers.11.mlp.down_proj"
    linears = {layer: find_target_linears(model)[layer]}
    selection = RankSelection(energy=0.99)
    ranks = {}
    for normalize in (False, True):
        subspace = estimate_activation_subspace(
            model, reference, linears, selection, False, normalize_tokens=normalize
        )
        ranks[normalize] = subspace.basis_for(layer).shape[1]
    tokens = sum(int(batch.attention_mask.sum()) for batch in reference)
    assert ranks[False] <= 2, ranks
    assert ranks[True] >= tokens // 4, (ranks, tokens)


def test_smollm2_recipes_run_offline_from_prepared_data(tmp_path, monkeypatch):
    """What docs/recipes.md tells a user to run, on the real model and offline: `trl-nullspace prepare
    smollm2` (a few prompts of each kind here), then the shipped SmolLM2 SFT and DPO YAMLs (a few steps)."""
    models = tmp_path / "outputs" / "models"
    models.mkdir(parents=True)
    (models / "smollm2-135m-instruct").symlink_to(real_model_path())
    monkeypatch.chdir(tmp_path)
    cli_main(["prepare", "smollm2", "--examples", "4", "--output-dir", "data/smollm2"])
    assert load_dataset_from("data/smollm2/safety_prompts")["harmful"].count(False) == 4
    for recipe, steps in (("sft", 2), ("dpo", 1)):
        completed = subprocess.run(
            [sys.executable, os.path.join(REPOSITORY, "recipes", f"{recipe}.py")]
            + ["--config", os.path.join(REPOSITORY, "recipes", "configs", f"smollm2-135m_{recipe}.yaml")]
            + ["--max_steps", str(steps)],
            cwd=tmp_path,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPOSITORY},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
        assert f"trained {steps} steps" in completed.stdout
        assert (tmp_path / "outputs" / "recipes" / f"smollm2-135m_{recipe}" / "model.safetensors").exists()


def _distinct_characters(completions, **kwargs) -> list[float]:
    """A stand-in reward that differs between any two samples, so every group has a gradient in two steps
    (the refusal reward of `make bench-rl` needs tens of steps before most groups disagree)."""
    return [float(len(set(completion_text(completion)))) for completion in completions]


def test_grpo_on_the_real_model_keeps_reference_outputs_while_plain_grpo_moves_them(smollm2, tmp_path):
    model, tokenizer = smollm2
    reference = tokenize_reference(general_dataset(), tokenizer, batch_size=4, max_length=64)
    before = logits_on(model, reference)
    prompts = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": text}]} for text in HARMFUL])
    arguments = _arguments(tmp_path) | dict(
        max_steps=2, per_device_train_batch_size=8, num_generations=4, max_completion_length=8, beta=0.0
    )
    for key in ("max_length", "weight_decay"):
        arguments.pop(key, None)
    drift = {}
    for config_class, settings, trainer_class, reference_data in (
        (NullSpaceGRPOConfig, {"nullspace_eigenvalue_threshold": 1e-12}, NullSpaceGRPOTrainer, general_dataset()),
        (GRPOConfig, {}, GRPOTrainer, None),
    ):
        extra = {} if reference_data is None else {"reference_dataset": reference_data}
        trainer = trainer_class(
            model=copy.deepcopy(model),
            reward_funcs=_distinct_characters,
            args=config_class(**arguments, **settings),
            train_dataset=prompts,
            processing_class=tokenizer,
            **extra,
        )
        trainer.train()
        drift[trainer_class.__name__] = (logits_on(trainer.model, reference) - before).abs().max().item()
        if hasattr(trainer, "nullspace_projector"):
            moved = max(
                (item.parameter.detach() - model.get_parameter(item.name)).abs().max().item()
                for item in trainer.nullspace_projector.constrained
            )
            assert moved > 1e-4  # the null-space trainer did train
    assert drift["GRPOTrainer"] > 0.1, drift
    assert drift["NullSpaceGRPOTrainer"] < 1e-3, drift
