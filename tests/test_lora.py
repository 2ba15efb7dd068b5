"""LoRA with A kept in the activation null space: B A K = 0, so reference outputs stay exact."""

import pytest
import torch
from peft import LoraConfig

from tests.conftest import logits_on, training_kwargs
from trl_nullspace import NullSpaceSFTConfig, NullSpaceSFTTrainer

STORAGES = {
    "basis": {},
    "offload": {"nullspace_offload": True, "nullspace_offload_block_mib": 2**-10},  # 4-column blocks
    # Enough reference tokens, and an energy rule, that some inputs keep over half their directions.
    "smaller": {
        "nullspace_basis_storage": "smaller",
        "nullspace_eigenvalue_threshold": None,
        "nullspace_energy": 0.999,
    },
}


@pytest.mark.parametrize("storage", sorted(STORAGES))
def test_lora_in_null_space_preserves_reference_logits(
    storage, model, tokenizer, safety_dataset, reference_dataset, safety_prompts, tmp_path
):
    """A stays orthogonal to its basis with the bases resident, offloaded, or kept as complements
    where smaller; with the strict threshold (every reference direction kept) the reference logits
    then stay exact while B trains."""
    import datasets

    from trl_nullspace.data import toy

    if storage == "smaller":
        reference_dataset = datasets.Dataset.from_dict(toy.as_text(toy.general_examples(40, seed=1)))
    settings = {"nullspace_eigenvalue_threshold": 1e-10} | STORAGES[storage]
    safety_before = logits_on(model, safety_prompts)
    trainer = NullSpaceSFTTrainer(
        model=model,
        args=NullSpaceSFTConfig(**training_kwargs(tmp_path), **settings),
        train_dataset=safety_dataset,
        processing_class=tokenizer,
        reference_dataset=reference_dataset,
        peft_config=LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )
    reference = trainer.nullspace.source.reference_batches
    before = logits_on(trainer.model, reference)
    trainer.train()

    projector = trainer.nullspace_projector
    assert projector.constrained and all(".lora_A." in item.name for item in projector.constrained)
    assert projector.free and all(".lora_B." in name for name in projector.free)
    complements = [item for item in projector.constrained if item.shared.complement]
    assert bool(complements) == (storage == "smaller")
    if storage == "offload":
        assert min(len(item.shared.columns) for item in projector.constrained) > 2
    for item in projector.constrained:
        lora_a, stored = item.parameter.detach(), item.shared.whole(torch.device("cpu"))
        in_subspace = lora_a - lora_a @ stored @ stored.T if item.shared.complement else lora_a @ stored
        assert in_subspace.abs().max() < 1e-5, item.name  # A U = 0
    lora_b = [p for n, p in trainer.model.named_parameters() if ".lora_B." in n]
    assert max(p.detach().abs().max().item() for p in lora_b) > 1e-3  # B actually trained
    assert (logits_on(trainer.model, safety_prompts) - safety_before).abs().max().item() > 0.05
    if storage != "smaller":  # the energy rule leaves 0.1% of the reference energy unprotected
        # Exact up to fp32 round-off, which the trained update amplifies layer by layer; see docs/concepts.md.
        assert (logits_on(trainer.model, reference) - before).abs().max().item() < 1e-4


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
