"""DPO, GRPO and RLOO with the null-space constraint: reference logits exact, plain trainers move them."""

import copy

import datasets
import pytest
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer

from tests.conftest import logits_on, train_and_measure, training_kwargs
from trl_nullspace import (
    CacheMismatchError,
    NullSpaceDPOConfig,
    NullSpaceDPOTrainer,
    NullSpaceGRPOConfig,
    NullSpaceGRPOTrainer,
    NullSpaceRLOOConfig,
    NullSpaceRLOOTrainer,
    NullSpaceSFTConfig,
    NullSpaceSFTTrainer,
)
from trl_nullspace.data import toy
from trl_nullspace.estimation.reference import tokenize_reference
from trl_nullspace.rewards import ClassifierSafetyReward, refusal_reward

STRICT = dict(nullspace_eigenvalue_threshold=1e-10)


@pytest.fixture(scope="module")
def preference_dataset():
    split = toy.safety_split(seed=0)
    harmful = [example for example in split["train"] if example.completion == toy.REFUSAL][:12]
    return datasets.Dataset.from_dict(toy.as_preference_pairs(harmful))


@pytest.fixture(scope="module")
def prompt_dataset():
    split = toy.safety_split(seed=0)
    return datasets.Dataset.from_dict(toy.as_labelled_prompts(split["train"][:8]))


def _resembles_refusal(texts: list[str]) -> list[float]:
    """Offline stand-in for a safety classifier: share of characters matching the refusal sentence."""
    return [sum(a == b for a, b in zip(text, toy.REFUSAL, strict=False)) / len(toy.REFUSAL) for text in texts]


SAFETY_REWARDS = [refusal_reward, ClassifierSafetyReward(scorer=_resembles_refusal, include_prompt=False)]


def _online_kwargs(tmp_path, **overrides):
    kwargs = training_kwargs(
        tmp_path,
        max_steps=4,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        learning_rate=2e-2,
        beta=0.0,
    )
    kwargs.pop("weight_decay")
    kwargs.update(overrides)
    return kwargs


def test_dpo_preserves_reference_logits(model, tokenizer, preference_dataset, reference_dataset, tmp_path):
    trainer = NullSpaceDPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),  # else TRL reloads it by name, from the Hub
        args=NullSpaceDPOConfig(**training_kwargs(tmp_path, max_steps=8), **STRICT),
        train_dataset=preference_dataset,
        processing_class=tokenizer,
        reference_dataset=reference_dataset,
    )
    before = logits_on(trainer.model, trainer.nullspace.source.reference_batches)
    trainer.train()
    assert (logits_on(trainer.model, trainer.nullspace.source.reference_batches) - before).abs().max().item() < 1e-4
    rewards = [entry["rewards/margins"] for entry in trainer.state.log_history if "rewards/margins" in entry]
    assert rewards[-1] > 0  # it learned to prefer the refusal


def test_plain_dpo_moves_reference_logits(tokenizer, preference_dataset, reference_dataset, tmp_path):
    model = toy.build_tiny_qwen2(tokenizer, seed=0)
    reference = tokenize_reference(reference_dataset, tokenizer, batch_size=8, max_length=512)
    before = logits_on(model, reference)
    trainer = DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=DPOConfig(**training_kwargs(tmp_path, max_steps=8)),
        train_dataset=preference_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    assert (logits_on(trainer.model, reference) - before).abs().max().item() > 1e-2


@pytest.mark.parametrize(("steps_per_generation", "num_iterations"), [(None, 1), (2, 2)])
def test_grpo_preserves_reference_logits_and_projects_per_optimizer_step(
    model,
    tokenizer,
    prompt_dataset,
    reference_dataset,
    tmp_path,
    projection_calls,
    steps_per_generation,
    num_iterations,
):
    trainer = NullSpaceGRPOTrainer(
        model=model,
        reward_funcs=SAFETY_REWARDS,
        args=NullSpaceGRPOConfig(
            **_online_kwargs(tmp_path, steps_per_generation=steps_per_generation, num_iterations=num_iterations),
            **STRICT,
        ),
        train_dataset=prompt_dataset,
        processing_class=tokenizer,
        reference_dataset=reference_dataset,
    )
    drift, change = train_and_measure(trainer)
    assert len(projection_calls) == trainer.state.global_step == 4
    assert drift < 1e-4 and change > 1e-2


def test_grpo_generates_every_rollout_from_projected_weights(
    model, tokenizer, prompt_dataset, reference_dataset, tmp_path
):
    """The rollouts of step k come from the weights after step k-1's projection. A stand-in for the
    vLLM weight sync (which TRL runs at the start of generation, when the step changed) copies the
    weights at every generation call; each copy must satisfy `W U = A` while differing from the
    start, so the projection runs before the next rollouts, never after them."""
    trainer = NullSpaceGRPOTrainer(
        model=model,
        reward_funcs=SAFETY_REWARDS,
        args=NullSpaceGRPOConfig(**_online_kwargs(tmp_path, max_steps=6), nullspace_energy=0.9),
        train_dataset=prompt_dataset,
        processing_class=tokenizer,
        reference_dataset=reference_dataset,
    )
    items = trainer.nullspace_projector.constrained
    start = {item.name: item.parameter.detach().clone() for item in items}
    synced = []
    generate = trainer._generate_single_turn

    def sync_then_generate(*args, **kwargs):
        weights = {item.name: item.parameter.detach().clone() for item in items}
        residual = max(
            (item.matrix_view(weights[item.name]) @ item.basis - item.anchor).abs().max().item() for item in items
        )
        moved = max((weights[name] - start[name]).abs().max().item() for name in start)
        synced.append((trainer.state.global_step, residual, moved))
        return generate(*args, **kwargs)

    trainer._generate_single_turn = sync_then_generate
    trainer.train()
    assert [step for step, _, _ in synced] == list(range(6))  # one rollout batch per step here
    assert all(residual < 1e-5 for _, residual, _ in synced), synced
    assert sum(moved > 1e-3 for _, _, moved in synced) >= 3, synced  # rollouts after real updates


def test_plain_grpo_moves_reference_logits(tokenizer, prompt_dataset, reference_dataset, tmp_path):
    model = toy.build_tiny_qwen2(tokenizer, seed=0)
    reference = tokenize_reference(reference_dataset, tokenizer, batch_size=8, max_length=512)
    before = logits_on(model, reference)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=SAFETY_REWARDS,
        args=GRPOConfig(**_online_kwargs(tmp_path)),
        train_dataset=prompt_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    assert (logits_on(trainer.model, reference) - before).abs().max().item() > 1e-2


def test_rloo_runs_with_projection(model, tokenizer, prompt_dataset, reference_dataset, tmp_path):
    trainer = NullSpaceRLOOTrainer(
        model=model,
        reward_funcs=SAFETY_REWARDS,
        args=NullSpaceRLOOConfig(**_online_kwargs(tmp_path), **STRICT),
        train_dataset=prompt_dataset,
        processing_class=tokenizer,
        reference_dataset=reference_dataset,
    )
    drift, change = train_and_measure(trainer)
    assert trainer.state.global_step == 4
    assert drift < 1e-4 and change > 1e-2
    assert any("nullspace/removed_frac" in entry for entry in trainer.state.log_history)
    # The update projection's removed norm is kept on the device between logs, then logged as a number.
    # A step can be zero (all sampled completions of a prompt tie, so every advantage is 0), not all of them.
    removed = [entry["nullspace/update_removed_norm"] for entry in trainer.state.log_history if "loss" in entry]
    assert removed and all(isinstance(value, float) and value >= 0 for value in removed) and max(removed) > 0


def test_sft_then_dpo_reuses_one_cached_subspace(
    model, tokenizer, safety_dataset, preference_dataset, reference_dataset, tmp_path, monkeypatch
):
    cache = str(tmp_path / "subspace.safetensors")
    sft = NullSpaceSFTTrainer(
        model=model,
        args=NullSpaceSFTConfig(**training_kwargs(tmp_path), nullspace_cache_path=cache, **STRICT),
        train_dataset=safety_dataset,
        processing_class=tokenizer,
        reference_dataset=reference_dataset,
    )
    reference = sft.nullspace.source.reference_batches
    base_logits = logits_on(sft.model, reference)
    sft.train()

    dpo_kwargs = dict(
        train_dataset=preference_dataset, processing_class=tokenizer, reference_dataset=reference_dataset
    )
    with pytest.raises(CacheMismatchError, match="different weights"):
        NullSpaceDPOTrainer(
            model=sft.model,
            ref_model=copy.deepcopy(sft.model),
            args=NullSpaceDPOConfig(**training_kwargs(tmp_path), nullspace_cache_path=cache, **STRICT),
            **dpo_kwargs,
        )

    from trl_nullspace.training.source import SubspaceSource

    monkeypatch.setattr(SubspaceSource, "estimate", lambda self: pytest.fail("re-estimated"))
    dpo = NullSpaceDPOTrainer(
        model=sft.model,
        ref_model=copy.deepcopy(sft.model),
        args=NullSpaceDPOConfig(
            **training_kwargs(tmp_path, max_steps=8),
            nullspace_cache_path=cache,
            nullspace_cache_match_weights=False,
            **STRICT,
        ),
        **dpo_kwargs,
    )
    dpo.train()
    assert (logits_on(dpo.model, reference) - base_logits).abs().max().item() < 1e-4


def test_the_constraint_is_announced_and_saved_with_the_model(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path, capsys
):
    import json

    from tests.conftest import make_sft_trainer
    from trl_nullspace.training.mixin import SETTINGS_FILE

    trainer = make_sft_trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset, nullspace_energy=0.9)
    trainer.train()
    assert "trl-nullspace: activation subspace, both projection" in capsys.readouterr().out
    trainer.save_model(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / SETTINGS_FILE).read_text())
    assert saved["method"] == "activation" and saved["rank_selection"]["energy"] == 0.9
    assert saved["constrained_parameters"] == len(trainer.nullspace_projector.constrained)
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Null-space constraint (trl-nullspace)" in card and "every update to the" in card
    examples = len(reference_dataset)
    assert (
        f"Reference data (the capabilities protected): a dataset passed to the trainer as `reference_dataset`, "
        f"{examples} examples" in card
    )
    assert "chosen by energy 0.9" in card and "lies outside the protected span" in card
    assert len(card.split("## Null-space constraint")[1].splitlines()) < 15  # prose, not a dump of keys


def test_per_layer_metrics_go_through_the_trainer_logs(model, tokenizer, safety_dataset, reference_dataset, tmp_path):
    """They reach every callback's `on_log`, which is how `report_to`'s integrations (TensorBoard, W&B,
    Trackio) receive metrics, and the saved log history."""
    from transformers import TrainerCallback

    from tests.conftest import make_sft_trainer

    class Reporter(TrainerCallback):  # stands in for a report_to integration (none is installed here)
        def __init__(self):
            self.reported: dict[str, float] = {}

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.reported.update(logs or {})

    trainer = make_sft_trainer(
        model,
        tokenizer,
        safety_dataset,
        tmp_path,
        reference_dataset,
        nullspace_energy=0.9,
        nullspace_log_per_layer=True,
    )
    reporter = Reporter()
    trainer.add_callback(reporter)
    trainer.train()
    logged = {key: value for entry in trainer.state.log_history for key, value in entry.items()}
    name = trainer.nullspace_projector.constrained[0].name
    assert 0.0 < logged[f"nullspace/removed_frac/{name}"] <= 1.0
    assert {"nullspace/removed_frac", f"nullspace/removed_frac/{name}"} <= set(reporter.reported)
    for key, basis in trainer.nullspace_subspace.bases.items():
        assert logged[f"nullspace/rank/{key}"] == basis.shape[1]


def test_the_start_summary_is_written_around_the_progress_bar(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path, monkeypatch
):
    """The Trainer's bar is drawn before the summary: a plain print landed inside the bar's line."""
    from tests.conftest import make_sft_trainer
    from trl_nullspace.training import mixin

    written = []
    monkeypatch.setattr(mixin.tqdm, "write", lambda text, file=None: written.append(text))
    trainer = make_sft_trainer(
        model, tokenizer, safety_dataset, tmp_path, reference_dataset, disable_tqdm=False, max_steps=1
    )
    trainer.train()
    ours = [text for text in written if isinstance(text, str) and text.startswith("trl-nullspace:")]
    assert len(ours) == 1 and ours[0].startswith("trl-nullspace: activation subspace")


def test_deepspeed_cpu_accelerator_notice_is_dropped_and_nothing_else():
    """DeepSpeed's import warns once per process on a machine without a GPU; trl_nullspace drops it."""
    import subprocess
    import sys

    from trl_nullspace.training.library_notices import CPU_ACCELERATOR_NOTICE

    def stdout_of(code: str) -> str:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout

    reach = "import deepspeed.comm; from deepspeed.utils import logger; logger.warning('a real warning')"
    plain = stdout_of(reach)
    if CPU_ACCELERATOR_NOTICE not in plain:
        pytest.skip("DeepSpeed found an accelerator here: it prints no CPU notice to drop")
    ours = stdout_of("import trl_nullspace; " + reach)
    assert CPU_ACCELERATOR_NOTICE not in ours and "a real warning" in ours
