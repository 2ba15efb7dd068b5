"""Bad input fails early with an error that names the problem."""

import random

import datasets
import pytest
import torch
from trl import SFTConfig

from tests.conftest import accelerator_launched_with, logits_on, make_sft_trainer, training_kwargs
from trl_nullspace import NullSpaceSFTConfig, NullSpaceSFTTrainer
from trl_nullspace.backends.selection import backend_for


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"nullspace_method": "svd"}, "nullspace_method must be one of"),
        ({"nullspace_projection_target": "weights"}, "nullspace_projection_target must be one of"),
        ({"nullspace_energy": 0.9, "nullspace_eigenvalue_threshold": 1e-3}, "not both"),
        ({"nullspace_energy": 1.5}, r"nullspace_energy must be in \(0, 1\]"),
        ({"nullspace_max_rank": 0}, "nullspace_max_rank must be a positive integer"),
    ],
)
def test_invalid_config_fields(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        NullSpaceSFTConfig(output_dir=str(tmp_path), **fields)


def test_missing_reference_data(model, tokenizer, safety_dataset, tmp_path):
    with pytest.raises(ValueError, match="No reference data for the capability subspace"):
        make_sft_trainer(model, tokenizer, safety_dataset, tmp_path)


def test_empty_reference_dataset(model, tokenizer, safety_dataset, tmp_path):
    empty = datasets.Dataset.from_dict({"text": []})
    with pytest.raises(ValueError, match="reference dataset is empty"):
        make_sft_trainer(model, tokenizer, safety_dataset, tmp_path, empty)


def test_reference_dataset_without_known_columns(model, tokenizer, safety_dataset, tmp_path):
    odd = datasets.Dataset.from_dict({"question": ["1+1="]})
    with pytest.raises(ValueError, match=r"columns \['question'\]; it needs 'text', 'messages', 'prompt'"):
        make_sft_trainer(model, tokenizer, safety_dataset, tmp_path, odd)


def test_missing_target_module(model, tokenizer, safety_dataset, reference_dataset, tmp_path):
    with pytest.raises(ValueError, match=r"\['c_attn'\] match no Linear layer"):
        make_sft_trainer(
            model, tokenizer, safety_dataset, tmp_path, reference_dataset, nullspace_target_modules=["c_attn"]
        )


def test_subspace_that_leaves_no_trainable_direction(model, tokenizer, safety_dataset, reference_dataset, tmp_path):
    generator = random.Random(0)
    texts = ["".join(generator.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(100)) for _ in range(8)]
    many = datasets.Dataset.from_dict({"text": texts})  # 800 tokens: every o_proj/down_proj input is full rank
    with pytest.raises(ValueError, match="full rank for every constrained parameter"):
        make_sft_trainer(
            model,
            tokenizer,
            safety_dataset,
            tmp_path,
            many,
            nullspace_eigenvalue_threshold=0.0,
            nullspace_target_modules=["o_proj", "down_proj"],
        )


def test_trl_own_config_is_taken_with_the_null_space_defaults(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path
):
    """A drop-in: `NullSpaceSFTTrainer(args=SFTConfig(...))` keeps every TRL setting and constrains at
    the defaults (energy 0.99), far below plain TRL's drift under the same settings."""
    from trl import SFTTrainer

    from tests.conftest import logits_on, train_and_measure
    from trl_nullspace.data import toy

    trainer = NullSpaceSFTTrainer(
        model=model,
        args=SFTConfig(**training_kwargs(tmp_path, learning_rate=3e-3)),
        train_dataset=safety_dataset,
        processing_class=tokenizer,
        reference_dataset=reference_dataset,
    )
    assert type(trainer.args) is NullSpaceSFTConfig and trainer.args.learning_rate == 3e-3
    assert trainer.args.nullspace_rank_selection.energy == 0.99 and trainer.args.nullspace_method == "activation"
    drift, moved = train_and_measure(trainer)
    plain = SFTTrainer(
        model=toy.build_tiny_qwen2(tokenizer, seed=0),
        args=SFTConfig(**training_kwargs(tmp_path / "plain", learning_rate=3e-3)),
        train_dataset=safety_dataset,
        processing_class=tokenizer,
    )
    before = logits_on(plain.model, trainer.nullspace.source.reference_batches)
    plain.train()
    plain_drift = (logits_on(plain.model, trainer.nullspace.source.reference_batches) - before).abs().max().item()
    # Measured: 0.16 against plain TRL's 1.14 (the default energy leaves 1% of the reference energy free).
    assert moved > 1e-2 and drift < plain_drift / 4, (moved, drift, plain_drift)


@pytest.mark.parametrize("name", ["GRPO", "RLOO"])
def test_trl_rl_configs_convert_without_deriving_their_settings_again(name, tmp_path):
    """GRPO and RLOO derive generation_batch_size in __post_init__; parsing the config again would refuse it."""
    import trl

    from trl_nullspace import config

    given = getattr(trl, f"{name}Config")(output_dir=str(tmp_path), steps_per_generation=2, use_cpu=True, bf16=False)
    converted = getattr(config, f"NullSpace{name}Config").from_trl_config(given)
    assert converted.generation_batch_size == given.generation_batch_size and converted.steps_per_generation == 2
    assert converted.nullspace_energy is None and converted.nullspace_rank_selection.energy == 0.99


def test_another_trainers_config_is_refused(model, tokenizer, safety_dataset, reference_dataset, tmp_path):
    from trl import DPOConfig

    with pytest.raises(TypeError, match=r"needs a NullSpaceSFTConfig \(or TRL's SFTConfig.*got DPOConfig"):
        make_sft_trainer(
            model, tokenizer, safety_dataset, tmp_path, reference_dataset, args=DPOConfig(**training_kwargs(tmp_path))
        )


def test_nan_gradients_stop_training_with_a_clear_error(model, tokenizer, safety_dataset, reference_dataset, tmp_path):
    trainer = make_sft_trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset, nullspace_energy=0.9)
    poisoned = trainer.model.model.layers[0].mlp.up_proj.weight
    poisoned.register_hook(lambda gradient: torch.full_like(gradient, float("nan")))
    with pytest.raises(
        FloatingPointError, match=r"NaN or inf gradients at optimizer step 0 in \['model.layers.0.mlp.up"
    ):
        trainer.train()


def test_nan_in_the_weights_is_named_as_the_cause_not_the_gradients(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path
):
    trainer = make_sft_trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset, nullspace_energy=0.9)
    with torch.no_grad():
        trainer.model.lm_head.weight[0, 0] = float("nan")  # frozen, but poisons the loss and every gradient
    with pytest.raises(FloatingPointError, match=r"NaN or inf in the model's weights .* \['lm_head.weight'\].*intact"):
        trainer.train()


def test_untargeted_parameters_are_frozen_by_default(model, tokenizer, safety_dataset, reference_dataset, tmp_path):
    trainer = make_sft_trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset, nullspace_energy=0.9)
    trainable = {name for name, parameter in trainer.model.named_parameters() if parameter.requires_grad}
    constrained = {item.name for item in trainer.nullspace_projector.constrained}
    assert trainable == constrained
    assert "model.embed_tokens.weight" not in trainable and "lm_head.weight" not in trainable
    assert not any(name.endswith("bias") or "norm" in name for name in trainable)


def test_untargeted_parameters_can_train_with_a_warning(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path, caplog
):
    from transformers.utils import logging

    logging.enable_propagation()
    trainer = make_sft_trainer(
        model,
        tokenizer,
        safety_dataset,
        tmp_path,
        reference_dataset,
        nullspace_energy=0.9,
        nullspace_freeze_untargeted=False,
    )
    assert trainer.model.model.embed_tokens.weight.requires_grad
    assert "are NOT constrained" in caplog.text and "embed_tokens" in caplog.text


def test_refresh_re_estimates_and_stays_exact(model, tokenizer, safety_dataset, reference_dataset, tmp_path):
    trainer = make_sft_trainer(
        model,
        tokenizer,
        safety_dataset,
        tmp_path,
        reference_dataset,
        nullspace_eigenvalue_threshold=1e-10,
        nullspace_refresh_steps=4,
    )
    first = trainer.nullspace_subspace
    before = logits_on(trainer.model, trainer.nullspace.source.reference_batches)
    trainer.train()
    assert trainer.nullspace_subspace is not first
    assert (logits_on(trainer.model, trainer.nullspace.source.reference_batches) - before).abs().max().item() < 1e-4


def test_fsdp1_is_refused_not_silently_ignored(model, tokenizer, safety_dataset, reference_dataset, tmp_path):
    trainer = make_sft_trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset, nullspace_energy=0.9)
    with pytest.raises(NotImplementedError, match="FSDP1.*would silently not apply"):
        backend_for(trainer.args, accelerator_launched_with("fsdp1"), trainer.model, "T")


@pytest.mark.parametrize(
    "backend, option, message",
    [
        ("fsdp2", {"nullspace_method": "gradient"}, "only nullspace_method='activation'"),
        ("deepspeed", {"nullspace_refresh_steps": 4}, "nullspace_refresh_steps is not supported under DeepSpeed"),
        (
            "deepspeed",
            {"nullspace_offload": True, "nullspace_method": "gradient"},
            "nullspace_offload under DeepSpeed with the activation method only",
        ),
        (
            "deepspeed",
            {"nullspace_basis_storage": "smaller", "nullspace_method": "gradient"},
            "'smaller' under DeepSpeed with the activation method only",
        ),
        ("deepspeed", {"nullspace_scale_learning_rate": True}, "nullspace_scale_learning_rate on one process"),
        ("fsdp2", {"nullspace_scale_learning_rate": True}, "under FSDP the whole gradient is never seen"),
    ],
)
def test_sharded_backends_refuse_options_they_cannot_honour(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path, backend, option, message
):
    trainer = make_sft_trainer(
        model, tokenizer, safety_dataset, tmp_path, reference_dataset, nullspace_energy=0.9, **option
    )
    with pytest.raises(NotImplementedError, match=message):
        backend_for(trainer.args, accelerator_launched_with(backend), trainer.model, "T")


@pytest.mark.parametrize(
    "option, deepspeed_refusal, conflicts",
    [
        (
            {"nullspace_shard_bases": True},
            r"under ZeRO-3 and FSDP2 \(this run: ZeRO-2\).*ZeRO-1/2 each rank already keeps only the bases",
            [
                (
                    {"nullspace_shard_bases": True, "nullspace_offload": True},
                    "nullspace_shard_bases and nullspace_offload",
                )
            ],
        ),
        (
            {"nullspace_step_snapshot": True},
            r"nullspace_step_snapshot under DeepSpeed ZeRO-3 only \(this run: ZeRO-2",
            [
                (
                    {"nullspace_step_snapshot": True, "nullspace_projection_target": "gradient"},
                    "the 'gradient' target projects none",
                ),
                (
                    {"nullspace_step_snapshot": True, "nullspace_offload": True},
                    "not supported with nullspace_offload yet",
                ),
            ],
        ),
        (
            {"nullspace_basis_storage": "smaller", "nullspace_complement_dtype": "bfloat16"},
            r"nullspace_complement_dtype='bfloat16' on one process, DDP, FSDP2 and DeepSpeed ZeRO-3 only \(this run: "
            "DeepSpeed",
            [
                (
                    {"nullspace_complement_dtype": "bfloat16", "nullspace_basis_storage": "basis"},
                    "nullspace_complement_dtype applies to the complements",
                ),
                (
                    {
                        "nullspace_complement_dtype": "bfloat16",
                        "nullspace_basis_storage": "smaller",
                        "nullspace_offload": True,
                    },
                    "nullspace_complement_dtype applies to the complements",
                ),
            ],
        ),
    ],
    ids=["split bases", "step snapshots", "bf16 complements"],
)
def test_fsdp2_storage_options_are_refused_where_they_are_not_built(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path, option, deepspeed_refusal, conflicts
):
    """The storage options built for FSDP2 and ZeRO-3 (split bases, step snapshots, bf16 complements) are refused
    by name under DeepSpeed ZeRO-2, which would keep the bases whole, keep anchors or store fp32 while the run's
    settings say otherwise; FSDP2 and ZeRO-3 accept them; and settings they cannot combine with are refused as the
    config is made."""
    trainer = make_sft_trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset, nullspace_energy=0.9)
    for key, value in option.items():
        setattr(trainer.args, key, value)
    with pytest.raises(NotImplementedError, match=deepspeed_refusal):
        backend_for(trainer.args, accelerator_launched_with("deepspeed"), trainer.model, "T")
    backend_for(trainer.args, accelerator_launched_with("fsdp2"), trainer.model, "T")  # accepted
    backend_for(trainer.args, accelerator_launched_with("deepspeed", zero_stage=3), trainer.model, "T")  # accepted
    for settings, message in conflicts:
        with pytest.raises(ValueError, match=message):
            NullSpaceSFTConfig(output_dir=str(tmp_path), **settings)


def test_split_bases_are_refused_on_one_process(model, tokenizer, safety_dataset, reference_dataset, tmp_path):
    """On one process (and DDP) nothing splits the bases: the trainer refuses the option with the alternative
    instead of keeping them whole while the run's settings say they are split. ZeRO-3 splits them."""
    trainer = make_sft_trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset, nullspace_energy=0.9)
    trainer.args.nullspace_shard_bases = True
    backend_for(trainer.args, accelerator_launched_with("deepspeed", zero_stage=3), trainer.model, "T")  # accepted
    with pytest.raises(NotImplementedError, match="under FSDP2 and DeepSpeed ZeRO-3 only.*one process or under DDP"):
        make_sft_trainer(
            model,
            tokenizer,
            safety_dataset,
            tmp_path,
            reference_dataset,
            nullspace_energy=0.9,
            nullspace_shard_bases=True,
        )


@pytest.mark.parametrize(
    "optim, target, message",
    [
        ("schedule_free_adamw", "update", "keeps its own copy of the weights' trajectory"),
        ("adamw_anyprecision", "update", "keeps its own copy of the weights' trajectory"),
        ("lomo", "update", "updates the weights during backward"),
        ("galore_adamw_layerwise", "gradient", "steps each layer inside backward"),
    ],
)
def test_optimizers_that_would_undo_the_projection_are_refused(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path, optim, target, message
):
    settings = {"optim": optim, "nullspace_energy": 0.9, "nullspace_projection_target": target}
    with pytest.raises(ValueError, match=message):
        make_sft_trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset, **settings)


def test_quantized_base_weights_are_refused_without_adapters(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path
):
    class TrainableQuantizer:  # as a QAT-capable quantizer: transformers' own check lets it through
        is_trainable = True
        is_qat_trainable = True

    model.hf_quantizer = TrainableQuantizer()  # what from_pretrained(quantization_config=...) sets
    with pytest.raises(ValueError, match="base weights are quantized.*LoRA"):
        make_sft_trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset, nullspace_energy=0.9)


def test_a_tiny_reference_set_warns_that_it_caps_the_rank(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path, caplog
):
    from transformers.utils import logging

    logging.enable_propagation()
    make_sft_trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset, nullspace_energy=0.9)
    assert "reference set has only" in caplog.text and "capped at rank" in caplog.text
    assert "The defaults were measured with 122 general examples (14219 tokens, 9 per input dimension" in caplog.text


def test_nan_in_the_reference_covariance_is_named(model, tokenizer, safety_dataset, reference_dataset, tmp_path):
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="reference input covariance contains NaN"):
        make_sft_trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset, nullspace_energy=0.9)


def test_a_deep_copy_of_an_sft_trained_model_is_named_not_estimated_wrongly(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path
):
    """TRL's SFTTrainer patches `model.forward` with a closure over the original model, so a deep
    copy runs the original's layers: the copy's hooks never fire. The error says how to undo it."""
    import copy

    trainer = make_sft_trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset, max_steps=1)
    trainer.train()
    with pytest.raises(RuntimeError, match=r"never called on the reference data.*del model.forward"):
        make_sft_trainer(copy.deepcopy(trainer.model), tokenizer, safety_dataset, tmp_path, reference_dataset)
    trained = trainer.model
    del trained.forward
    make_sft_trainer(copy.deepcopy(trained), tokenizer, safety_dataset, tmp_path, reference_dataset)


def test_a_config_starts_without_warnings_the_user_cannot_act_on(tmp_path):
    """TRL's configs set `gradient_checkpointing`, which transformers 5 deprecates: one FutureWarning per
    config (plain TRL's too, in a comparison) and per process, naming a field the user never set."""
    import subprocess
    import sys

    make = f"SFTConfig(output_dir={str(tmp_path)!r}, use_cpu=True)"
    command = [sys.executable, "-W", "always::FutureWarning", "-c"]
    control = subprocess.run([*command, f"from trl import SFTConfig; {make}"], capture_output=True, text=True)
    assert "`gradient_checkpointing` is deprecated" in control.stderr  # the warning exists: the test can fail
    ours = subprocess.run(
        [*command, f"import trl_nullspace; from trl import SFTConfig; {make}; trl_nullspace.NullSpace{make}"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "gradient_checkpointing" not in ours.stderr


def test_zero3_step_snapshots_need_the_start_of_deepspeeds_step(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path
):
    """Under ZeRO-3 the snapshot is taken at the start of DeepSpeed's step; 'around_step' runs nothing there, so
    the two together are refused instead of projecting a change measured after the step (zero)."""
    trainer = make_sft_trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset, nullspace_energy=0.9)
    trainer.args.nullspace_step_snapshot = True
    trainer.args.nullspace_deepspeed_projection = "around_step"
    with pytest.raises(NotImplementedError, match="takes the step snapshots at the start of DeepSpeed's step"):
        backend_for(trainer.args, accelerator_launched_with("deepspeed", zero_stage=3), trainer.model, "T")
