"""LoRA with A kept in the activation null space: B A K = 0, so reference outputs stay exact."""

import pytest
from peft import LoraConfig

from tests.conftest import logits_on, training_kwargs
from trl_nullspace import NullSpaceSFTConfig, NullSpaceSFTTrainer


def test_lora_in_null_space_preserves_reference_logits(
    model, tokenizer, safety_dataset, reference_dataset, safety_prompts, tmp_path
):
    safety_before = logits_on(model, safety_prompts)
    trainer = NullSpaceSFTTrainer(
        model=model,
        args=NullSpaceSFTConfig(**training_kwargs(tmp_path), nullspace_eigenvalue_threshold=1e-10),
        train_dataset=safety_dataset,
        processing_class=tokenizer,
        reference_dataset=reference_dataset,
        peft_config=LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )
    reference = trainer._reference_batches
    before = logits_on(trainer.model, reference)
    trainer.train()

    projector = trainer.nullspace_projector
    assert projector.constrained and all(".lora_A." in item.name for item in projector.constrained)
    assert projector.free and all(".lora_B." in name for name in projector.free)
    for item in projector.constrained:
        assert (item.parameter.detach() @ item.basis).abs().max() < 1e-5  # A U = 0
    lora_b = [p for n, p in trainer.model.named_parameters() if ".lora_B." in n]
    assert max(p.detach().abs().max().item() for p in lora_b) > 1e-3  # B actually trained

    # Exact up to fp32 round-off, which the trained update amplifies layer by layer; see docs/concepts.md.
    assert (logits_on(trainer.model, reference) - before).abs().max().item() < 1e-4
    assert (logits_on(trainer.model, safety_prompts) - safety_before).abs().max().item() > 0.05


def test_lora_with_gradient_method_is_refused(model, tokenizer, safety_dataset, reference_dataset, tmp_path):
    with pytest.raises(ValueError, match="use nullspace_method='activation' with LoRA"):
        NullSpaceSFTTrainer(
            model=model,
            args=NullSpaceSFTConfig(**training_kwargs(tmp_path), nullspace_method="gradient"),
            train_dataset=safety_dataset,
            processing_class=tokenizer,
            reference_dataset=reference_dataset,
            peft_config=LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"),
        )
