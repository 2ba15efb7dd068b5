"""One test matrix for every registered kind of constrained parameter (`trl_nullspace.projection.kinds`):
each trains with the constraint and keeps the reference logits, trains as plain TRL and moves them,
and binds again the same way from a saved cache. A kind registered without a case here fails."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from tests.conftest import logits_on, training_kwargs
from tests.test_architectures import MIXTURE_OF_EXPERTS, build
from trl_nullspace import NullSpaceSFTConfig, NullSpaceSFTTrainer, load_subspace, save_subspace
from trl_nullspace.projection.kinds.registry import registered_kinds
from trl_nullspace.projection.projector import SubspaceProjector

STRICT = {"nullspace_eigenvalue_threshold": 1e-10}  # every reference direction kept: preservation is exact
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}
# Per kind: the tiny model that has it, the null-space settings that bind it, and a LoRA config or None.
CASES = {
    "dense": ("qwen2", {}, STRICT, None),
    "fused_experts": ("mixtral", MIXTURE_OF_EXPERTS["mixtral"], STRICT, None),
    "lora": ("qwen2", {}, STRICT, LORA),
    "flat": ("qwen2", {}, {"nullspace_method": "gradient"}, None),
}


def test_every_registered_kind_runs_in_the_matrix():
    assert set(registered_kinds()) == set(CASES)


def _trainers(kind, tokenizer, safety_dataset, reference_dataset, tmp_path, **options):
    model_type, extra, settings, lora = CASES[kind]
    peft_config = LoraConfig(**lora) if lora else None
    null_space = NullSpaceSFTTrainer(
        model=build(model_type, tokenizer, extra),
        args=NullSpaceSFTConfig(**training_kwargs(tmp_path / "null-space"), **settings, **options),
        train_dataset=safety_dataset,
        processing_class=tokenizer,
        reference_dataset=reference_dataset,
        peft_config=peft_config,
    )
    plain = SFTTrainer(
        model=build(model_type, tokenizer, extra),
        args=SFTConfig(**training_kwargs(tmp_path / "plain")),
        train_dataset=safety_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    return null_space, plain


def _subspace_share(items, weights_of, before) -> float:
    """The largest share of any constrained tensor's change since `before` that lies in its basis:
    ‖ΔM U‖ / ‖ΔM‖, ΔM read through each item's matrix view of the weights `weights_of` names."""
    shares = []
    for item in items:
        change = item.matrix_view(weights_of[item.parameter_name].detach()) - item.matrix_view(before[item.name])
        shares.append(((change @ item.basis).norm() / change.norm().clamp_min(1e-30)).item())
    return max(shares)


@pytest.mark.parametrize("step_snapshot", [False, True], ids=["anchors", "step snapshots"])
@pytest.mark.parametrize("kind", sorted(CASES))
def test_each_kind_keeps_its_change_out_of_the_subspace_where_plain_trl_does_not(
    kind, step_snapshot, tokenizer, safety_dataset, reference_dataset, tmp_path
):
    """Every kind's invariant: what training changed in a constrained tensor lies outside its basis, so
    (activation kinds) reference outputs stay put; plain TRL's change of the same tensors does not. The
    same with each step's change projected from a snapshot instead of anchors (`nullspace_step_snapshot`)."""
    null_space, plain = _trainers(
        kind, tokenizer, safety_dataset, reference_dataset, tmp_path, nullspace_step_snapshot=step_snapshot
    )
    items = [item for item in null_space.nullspace_projector.constrained if item.kind == kind]
    assert items, f"nothing of kind {kind!r} was constrained"
    reference = null_space.nullspace.source.reference_batches
    drifts, shares = [], []
    for trainer in (null_space, plain):
        weights = dict(trainer.model.named_parameters())
        before = {item.name: weights[item.parameter_name].detach().clone() for item in items}
        logits_before = logits_on(trainer.model, reference)
        trainer.train()
        drifts.append((logits_on(trainer.model, reference) - logits_before).abs().max().item())
        shares.append(_subspace_share(items, dict(trainer.model.named_parameters()), before))
    assert shares[0] < 1e-5 and shares[1] > 1e-2, shares
    assert drifts[1] > 1e-2, drifts
    if null_space.nullspace_subspace.method == "activation":  # the gradient method holds outputs to first order only
        assert drifts[0] < 1e-3 and drifts[0] < drifts[1] / 100, drifts


@pytest.mark.parametrize("kind", sorted(CASES))
def test_each_kind_binds_the_same_from_a_saved_cache(kind, tokenizer, safety_dataset, reference_dataset, tmp_path):
    null_space, _ = _trainers(kind, tokenizer, safety_dataset, reference_dataset, tmp_path)
    path = str(tmp_path / "subspace.safetensors")
    save_subspace(path, null_space.nullspace_subspace, {})
    loaded, _ = load_subspace(path)
    rebound = SubspaceProjector.bind(null_space.model, loaded)
    original = null_space.nullspace_projector
    assert [(item.name, item.kind) for item in rebound.constrained] == [
        (item.name, item.kind) for item in original.constrained
    ]
    assert rebound.free == original.free
    for first, second in zip(original.constrained, rebound.constrained, strict=True):
        assert torch.equal(first.shared.whole(torch.device("cpu")), second.shared.whole(torch.device("cpu")))
