"""Configurations under which the constraint would silently not hold are refused, with the fix.

Each test would pass the configuration through on a trainer without the guard: the adapters and
optimizers below are all accepted by TRL and PEFT.
"""

import pytest
import torch
from peft import LoraConfig

from tests.conftest import logits_on, make_sft_trainer, train_and_measure, training_kwargs
from tests.test_architectures import MIXTURE_OF_EXPERTS, build


def _peft_trainer(model, tokenizer, safety_dataset, reference_dataset, tmp_path, peft_config):
    return make_sft_trainer(
        model,
        tokenizer,
        safety_dataset,
        tmp_path,
        reference_dataset,
        peft_config=peft_config,
        nullspace_eigenvalue_threshold=1e-10,
    )


def _lora_trainer(model, tokenizer, safety_dataset, reference_dataset, tmp_path, **lora):
    config = LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **{"target_modules": "all-linear", **lora})
    return _peft_trainer(model, tokenizer, safety_dataset, reference_dataset, tmp_path, config)


def test_dora_is_refused(model, tokenizer, safety_dataset, reference_dataset, tmp_path):
    with pytest.raises(ValueError, match=r"DoRA adapters \(use_dora=True.*Use plain LoRA"):
        _lora_trainer(model, tokenizer, safety_dataset, reference_dataset, tmp_path, use_dora=True)


@pytest.mark.parametrize("init", [False, "olora", "pissa", "eva"])
def test_lora_that_does_not_start_at_zero_is_refused_before_changing_the_model(
    model, tokenizer, safety_dataset, reference_dataset, safety_prompts, tmp_path, init
):
    with pytest.raises(ValueError, match=rf"LoraConfig\(init_lora_weights={init!r}\).*init_lora_weights=True"):
        _lora_trainer(model, tokenizer, safety_dataset, reference_dataset, tmp_path, init_lora_weights=init)


def test_a_loaded_adapter_with_nonzero_b_is_refused(model, tokenizer, safety_dataset, reference_dataset, tmp_path):
    """An adapter trained before (its config plain LoRA) already changes the model: caught on the modules."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    for name, parameter in peft_model.named_parameters():
        if ".lora_B." in name:
            parameter.data.fill_(0.01)
    with pytest.raises(ValueError, match="whose B is not zero at the start.*init_lora_weights=True"):
        make_sft_trainer(peft_model, tokenizer, safety_dataset, tmp_path, reference_dataset)


LORA_VARIANTS = {
    "kasa_config": (lambda: __import__("peft").KasaConfig(), "KaSA truncates the base weights"),
    "use_qalora": (True, "QA-LoRA pools the layer input"),
    "lora_bias": (True, "a trainable bias on B"),
    "layer_replication": ([[0, 2], [1, 2]], "replicated layers"),
}


@pytest.mark.parametrize("setting", sorted(LORA_VARIANTS))
def test_lora_variants_not_known_to_hold_are_refused_by_name(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path, setting
):
    """Each of these trains without error and moves reference outputs (KaSA before the first step)."""
    value, why = LORA_VARIANTS[setting]
    value = value() if callable(value) else value
    with pytest.raises(ValueError, match=rf"LoraConfig\({setting}=.*not supported: {why}.*Unset it"):
        _lora_trainer(model, tokenizer, safety_dataset, reference_dataset, tmp_path, **{setting: value})


@pytest.mark.parametrize(
    ("setting", "fix", "marker"),
    [
        ({"bias": "all"}, "set bias='none'", "bias"),
        ({"trainable_token_indices": [0, 1]}, "remove trainable_token_indices", "trainable_tokens"),
    ],
)
def test_lora_settings_the_trainer_freezes_say_so(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path, caplog, setting, fix, marker
):
    """Before, these were frozen with an info log only: the user's request was dropped silently."""
    with caplog.at_level("WARNING", logger="trl_nullspace"):
        trainer = _lora_trainer(model, tokenizer, safety_dataset, reference_dataset, tmp_path, **setting)
    name, value = next(iter(setting.items()))
    assert f"LoraConfig({name}={value!r})" in caplog.text and fix in caplog.text
    made = [parameter for name, parameter in trainer.model.named_parameters() if marker in name]
    assert made and not any(parameter.requires_grad for parameter in made)


def _other_peft_configs() -> dict:
    import peft

    modules = ["q_proj", "v_proj"]
    return {
        "ADALORA": peft.AdaLoraConfig(target_modules=modules, total_step=10, task_type="CAUSAL_LM"),
        "IA3": peft.IA3Config(target_modules=modules, feedforward_modules=[], task_type="CAUSAL_LM"),
        "LOHA": peft.LoHaConfig(target_modules=modules, task_type="CAUSAL_LM"),
        "LOKR": peft.LoKrConfig(target_modules=modules, task_type="CAUSAL_LM"),
        "VERA": peft.VeraConfig(target_modules=["q_proj"], r=4, task_type="CAUSAL_LM"),
        "OFT": peft.OFTConfig(target_modules=modules, r=0, oft_block_size=8, task_type="CAUSAL_LM"),
        "BOFT": peft.BOFTConfig(target_modules=modules, boft_block_size=8, task_type="CAUSAL_LM"),
        "PREFIX_TUNING": peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
        "PROMPT_TUNING": peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    }


@pytest.mark.parametrize("peft_type", sorted(_other_peft_configs()))
def test_other_peft_types_are_refused_by_name(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path, peft_type
):
    """Before, these reached the estimator: a "constrains none of … check nullspace_target_modules" error
    that sent the user to the wrong setting, or a shape error (prompt tuning)."""
    why = "prompt learning adds trained virtual tokens" if "_TUNING" in peft_type else "not a LoRA B·A product"
    with pytest.raises(ValueError, match=rf"PEFT {peft_type} adapters .*{why}.*Use LoraConfig"):
        _peft_trainer(model, tokenizer, safety_dataset, reference_dataset, tmp_path, _other_peft_configs()[peft_type])


def test_lora_on_embeddings_is_refused(model, tokenizer, safety_dataset, reference_dataset, tmp_path):
    with pytest.raises(ValueError, match=r"LoRA on embedding layers .* remove them from target_modules"):
        _lora_trainer(
            model, tokenizer, safety_dataset, reference_dataset, tmp_path, target_modules=["q_proj", "embed_tokens"]
        )


def test_modules_to_save_are_refused(model, tokenizer, safety_dataset, reference_dataset, tmp_path):
    with pytest.raises(ValueError, match="modules_to_save copies"):
        _lora_trainer(
            model,
            tokenizer,
            safety_dataset,
            reference_dataset,
            tmp_path,
            target_modules=["q_proj"],
            modules_to_save=["lm_head"],
        )


def test_plain_lora_from_zero_still_trains_exactly(model, tokenizer, safety_dataset, reference_dataset, tmp_path):
    trainer = _lora_trainer(model, tokenizer, safety_dataset, reference_dataset, tmp_path)
    reference = trainer.nullspace.source.reference_batches
    before = logits_on(trainer.model, reference)
    trainer.train()
    assert (logits_on(trainer.model, reference) - before).abs().max().item() < 1e-4


def test_an_optimizer_built_on_other_parameters_is_refused(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path
):
    import copy

    stranger = copy.deepcopy(model)
    trainer = make_sft_trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset)
    trainer.optimizer = torch.optim.AdamW(stranger.parameters(), lr=1e-3)
    with pytest.raises(RuntimeError, match="does not step the constrained parameters"):
        trainer.train()


def test_an_optimizer_that_trains_frozen_parameters_is_refused(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path
):
    trainer = make_sft_trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset)
    trainer.model.lm_head.weight.requires_grad_(True)  # made trainable after set-up
    trainer.optimizer = torch.optim.AdamW([p for p in trainer.model.parameters() if p.requires_grad], lr=1e-3)
    with pytest.raises(RuntimeError, match=r"trains \['lm_head.weight'\].*neither constrained nor frozen"):
        trainer.train()


def test_a_schedule_free_optimizer_passed_directly_is_refused(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path
):
    class ScheduleFreeAdamW(torch.optim.AdamW):  # stands in for schedulefree's class (not installed)
        pass

    trainer = make_sft_trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset)
    trainer.optimizer = ScheduleFreeAdamW([p for p in trainer.model.parameters() if p.requires_grad], lr=1e-3)
    with pytest.raises(ValueError, match="restores or bypasses"):
        trainer.train()


def test_start_line_counts_frozen_parameters_and_states_the_protected_energy(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path
):
    trainer = make_sft_trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset, nullspace_energy=0.9)
    frozen = len(trainer.nullspace_projector.unconstrained)
    trainer.nullspace.projector = trainer.nullspace.bind(trainer.model, trainer.nullspace.subspace)  # as a resumed run
    line = trainer.nullspace_start_summary()
    assert f"{frozen} other parameters frozen" in line and frozen > 0
    assert "of the reference data's layer-input energy on average" in line
    assert trainer.nullspace_settings()["energy_protected_mean"] >= 0.9


def test_lora_on_parameters_is_refused(tokenizer, safety_dataset, reference_dataset, tmp_path):
    """PEFT's `target_parameters` (LoRA on fused MoE experts) wraps a parameter the projection does not reach."""
    model = build("mixtral", tokenizer, MIXTURE_OF_EXPERTS["mixtral"])
    lora = LoraConfig(r=4, target_modules=["q_proj"], target_parameters=["experts.gate_up_proj"])
    with pytest.raises(ValueError, match=r"LoRA on parameters \(target_parameters, e.g. .*experts.gate_up_proj\)"):
        _peft_trainer(model, tokenizer, safety_dataset, reference_dataset, tmp_path, lora)


def _forty_example_reference():
    import datasets

    from trl_nullspace.data import toy

    return datasets.Dataset.from_dict(toy.as_text(toy.general_examples(40, seed=1)))


def test_a_threshold_whose_dropped_directions_add_up_warns_with_the_residual(
    model, tokenizer, safety_dataset, tmp_path, caplog
):
    """At t = 1e-3 every dropped eigenvalue is below 1e-3 of the largest, yet together they leave 0.044 of
    the reference inputs' size outside the span (> √t = 0.032); the warning and the settings say so, and
    the residual they state is what the reference inputs really keep outside the bases."""
    from trl_nullspace.estimation.activation import energy_in_span
    from trl_nullspace.projection.targets import find_target_linears

    with caplog.at_level("WARNING", logger="transformers"):
        trainer = make_sft_trainer(
            model, tokenizer, safety_dataset, tmp_path, _forty_example_reference(), nullspace_eigenvalue_threshold=1e-3
        )
    assert "nullspace_eigenvalue_threshold=0.001 leaves up to" in caplog.text
    assert "nullspace_energy=1 - r**2" in caplog.text
    settings = trainer.nullspace_settings()
    worst = settings["energy_protected_least_basis"]
    measured = energy_in_span(
        trainer.model,
        trainer.nullspace.source.reference_batches,
        find_target_linears(trainer.model),
        trainer.nullspace_subspace,
        True,
    )
    assert settings["reference_residual_max"] > 0.032
    assert abs(settings["reference_residual_max"] - (1 - measured[worst]) ** 0.5) < 1e-6
    assert "lies outside the protected span" in trainer.nullspace_start_summary()


def test_the_energy_rule_bounds_the_residual_and_the_drift(model, tokenizer, safety_dataset, tmp_path, caplog):
    """nullspace_energy = 1 − r² is the rule with a stated tolerance: residual ≤ r, no warning, and the
    reference logits then move by round-off only, under 12 steps at 1e-2."""

    with caplog.at_level("WARNING", logger="transformers"):
        trainer = make_sft_trainer(
            model, tokenizer, safety_dataset, tmp_path, _forty_example_reference(), nullspace_energy=1 - 1e-12
        )
    assert "leaves up to" not in caplog.text
    assert trainer.nullspace_settings()["reference_residual_max"] <= 1e-6
    drift, moved = train_and_measure(trainer)
    assert moved > 1e-2 and drift < 1e-4, (moved, drift)


def test_bf16_weights_hold_only_to_the_bf16_floor_and_say_so(
    tokenizer, safety_dataset, reference_dataset, tmp_path, caplog
):
    """Weights held in bf16 are rounded at every step, and the rounding is not in the null space. Measured
    here (12 steps at 1e-2): the null-space run moves the reference logits by 0.056, 14 times the spacing
    of bf16 numbers at their size (the finest change a bf16 output can show) but 1/50 of plain TRL's 2.95,
    where fp32 weights keep them within 1e-6. The start warns, naming the fix (fp32 weights, bf16 autocast)."""
    from trl import SFTConfig, SFTTrainer

    from trl_nullspace.data import toy

    def bf16_model():
        return toy.build_tiny_qwen2(tokenizer, seed=0).to(torch.bfloat16)

    with caplog.at_level("WARNING", logger="transformers"):
        trainer = make_sft_trainer(
            bf16_model(), tokenizer, safety_dataset, tmp_path, reference_dataset, nullspace_eigenvalue_threshold=1e-10
        )
    assert "approximate constraint: the constrained weights are held in bfloat16" in caplog.text
    reference = trainer.nullspace.source.reference_batches
    drift, moved = train_and_measure(trainer)
    plain = SFTTrainer(
        model=bf16_model(),
        args=SFTConfig(**training_kwargs(tmp_path / "plain")),
        train_dataset=safety_dataset,
        processing_class=tokenizer,
    )
    before = logits_on(plain.model, reference)
    plain.train()
    plain_drift = (logits_on(plain.model, reference) - before).abs().max().item()
    assert moved > 1e-2, moved
    assert 1e-3 < drift < plain_drift / 20, (drift, plain_drift)  # above fp32's round-off, far below plain TRL


@pytest.mark.parametrize(
    ("setting", "said"),
    [
        ({"nullspace_method": "gradient"}, "nullspace_method='gradient' keeps updates out"),
        ({"nullspace_projection_target": "gradient"}, "nullspace_projection_target='gradient' projects only"),
        ({"nullspace_projection_dtype": "bfloat16"}, "nullspace_projection_dtype='bfloat16' leaves"),
        ({"nullspace_max_rank": 2, "nullspace_eigenvalue_threshold": 1e-10}, "nullspace_max_rank=2 caps"),
    ],
)
def test_each_approximate_setting_is_named_at_start(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path, caplog, setting, said
):
    with caplog.at_level("WARNING", logger="transformers"):
        make_sft_trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset, **setting)
    assert f"approximate constraint: {said}" in caplog.text


def test_the_exact_defaults_warn_of_no_approximation(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path, caplog
):
    with caplog.at_level("WARNING", logger="transformers"):
        make_sft_trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset)
    assert "approximate constraint" not in caplog.text
