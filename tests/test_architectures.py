"""Preservation on tiny configs of the architectures users train (the rows of docs/architectures.md).

Each model is built from a small config of its transformers class (random weights, the toy
tokenizer), trained by the null-space SFT trainer with a strict threshold, and must keep its
reference logits while its constrained weights move; plain TRL under the same settings moves them.
"""

import pytest
import torch
from peft import LoraConfig
from transformers import AutoConfig, AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from tests.conftest import (
    accelerator_launched_with,
    logits_on,
    make_sft_trainer,
    train_and_measure,
    training_kwargs,
)
from trl_nullspace import NullSpaceSFTConfig, NullSpaceSFTTrainer
from trl_nullspace.backends.selection import backend_for
from trl_nullspace.estimation.activation import estimate_activation_subspace
from trl_nullspace.estimation.rank import RankSelection

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
DENSE = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma2": {"head_dim": 16},
    "gemma3_text": {"head_dim": 16},
    "phi3": {"pad_token_id": 0},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64},  # its MLP sees (tokens, features) inputs
}


def build(model_type: str, tokenizer, extra: dict):
    config = AutoConfig.for_model(
        model_type,
        **{
            **COMMON,
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.eos_token_id,
            **extra,
        },
    )
    config._name_or_path = f"tiny-{model_type}"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def plain_trl_drift(model_type: str, extra: dict, tokenizer, safety_dataset, reference, tmp_path) -> float:
    """How far plain TRL's SFTTrainer moves the reference logits of the same model, same settings."""
    plain = SFTTrainer(
        model=build(model_type, tokenizer, extra),
        args=SFTConfig(**training_kwargs(tmp_path / "plain")),
        train_dataset=safety_dataset,
        processing_class=tokenizer,
    )
    before = logits_on(plain.model, reference)
    plain.train()
    return (logits_on(plain.model, reference) - before).abs().max().item()


@pytest.mark.parametrize("model_type", sorted(DENSE))
def test_dense_architecture_keeps_reference_outputs(
    model_type, tokenizer, safety_dataset, reference_dataset, tmp_path
):
    model = build(model_type, tokenizer, DENSE[model_type])
    trainer = make_sft_trainer(
        model, tokenizer, safety_dataset, tmp_path, reference_dataset, nullspace_eigenvalue_threshold=1e-10
    )
    plain_drift = plain_trl_drift(
        model_type, DENSE[model_type], tokenizer, safety_dataset, trainer.nullspace.source.reference_batches, tmp_path
    )
    drift, moved = train_and_measure(trainer)
    assert moved > 1e-2, moved
    assert plain_drift > 1e-2, plain_drift
    assert drift < 1e-3 and drift < plain_drift / 100, (
        drift,
        plain_drift,
    )  # fp32 round-off, amplified by Gemma's scaling


MIXTURE_OF_EXPERTS = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {  # a shared expert (nn.Linear on (tokens, features) inputs) beside the fused experts
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
    },
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16},
    # experts stored transposed (experts × in × out), with biases and interleaved gate/up
    "gpt_oss": {
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "head_dim": 16,
        "layer_types": ["full_attention"] * 2,
    },
}


@pytest.mark.parametrize("model_type", sorted(MIXTURE_OF_EXPERTS))
def test_mixture_of_experts_constrains_every_expert_and_the_router(
    model_type, tokenizer, safety_dataset, reference_dataset, tmp_path
):
    """Each expert's slice of the fused 3-D weights is constrained by the tokens routed to it, the
    router by its input: experts and router train, and the reference logits stay put."""
    model = build(model_type, tokenizer, MIXTURE_OF_EXPERTS[model_type])
    trainer = make_sft_trainer(
        model, tokenizer, safety_dataset, tmp_path, reference_dataset, nullspace_eigenvalue_threshold=1e-10
    )
    constrained = {item.parameter_name for item in trainer.nullspace_projector.constrained}
    experts = {name for name, parameter in model.named_parameters() if parameter.dim() == 3}
    routers = {
        name for name in dict(model.named_parameters()) if name.endswith((".mlp.gate.weight", ".mlp.router.weight"))
    }
    assert experts and routers and experts | routers <= constrained
    sharded = trainer.nullspace_projector.on_row_shards()  # DeepSpeed and FSDP2 freeze the experts instead
    assert all(item.expert is None for item in sharded.constrained) and experts <= set(sharded.unconstrained)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters() if name in experts}
    plain_drift = plain_trl_drift(
        model_type,
        MIXTURE_OF_EXPERTS[model_type],
        tokenizer,
        safety_dataset,
        trainer.nullspace.source.reference_batches,
        tmp_path,
    )
    drift, moved = train_and_measure(trainer)
    experts_moved = max(
        (parameter - before[name]).abs().max().item()
        for name, parameter in model.named_parameters()
        if name in experts
    )
    assert plain_drift > 1e-2, plain_drift
    assert experts_moved > 1e-3 and moved > 1e-2 and drift < 1e-4, (experts_moved, moved, drift)


def test_mixture_of_experts_subspace_survives_the_cache_and_the_contrastive_rule(
    tokenizer, safety_dataset, reference_dataset, tmp_path, caplog
):
    """Expert bases are saved and reused by name (`<experts>.gate_up_proj[e]`), and the contrastive rule
    handles experts that no reference token reaches (an empty basis, not an error)."""
    cache = str(tmp_path / "moe.safetensors")

    def trainer(name: str):
        model = build("mixtral", tokenizer, MIXTURE_OF_EXPERTS["mixtral"])
        return make_sft_trainer(
            model,
            tokenizer,
            safety_dataset,
            tmp_path / name,
            reference_dataset,
            nullspace_energy=0.99,
            nullspace_contrastive=True,
            nullspace_cache_path=cache,
        )

    first = trainer("first")
    with caplog.at_level("INFO", logger="trl_nullspace"):
        second = trainer("second")
    assert "loaded the capability subspace" in caplog.text
    keys = [key for key in first.nullspace_subspace.bases if key.endswith("]")]
    assert keys and all(
        torch.equal(first.nullspace_subspace.bases[key], second.nullspace_subspace.bases[key]) for key in keys
    )
    assert {item.expert for item in second.nullspace_projector.constrained} >= {0, 1, 2, 3}


def test_experts_chosen_by_target_modules_are_constrained_and_the_rest_frozen(
    tokenizer, safety_dataset, reference_dataset, tmp_path
):
    """`nullspace_target_modules` selects expert weights by name like Linears: `down_proj` constrains
    every expert's `down_proj` (and the dense `down_proj`s), and leaves `gate_up_proj` frozen."""
    model = build("mixtral", tokenizer, MIXTURE_OF_EXPERTS["mixtral"])
    trainer = make_sft_trainer(
        model,
        tokenizer,
        safety_dataset,
        tmp_path,
        reference_dataset,
        nullspace_eigenvalue_threshold=1e-10,
        nullspace_target_modules=["q_proj", "down_proj"],
    )
    constrained = {item.parameter_name for item in trainer.nullspace_projector.constrained}
    parameters = dict(model.named_parameters())
    assert {name for name in parameters if name.endswith("experts.down_proj")} <= constrained
    assert not any(parameters[name].requires_grad for name in parameters if name.endswith("experts.gate_up_proj"))
    before = {name: parameters[name].detach().clone() for name in parameters if name.endswith("experts.down_proj")}
    drift, _ = train_and_measure(trainer)
    assert max((parameters[name] - value).abs().max().item() for name, value in before.items()) > 1e-3
    assert drift < 1e-4, drift


def test_experts_the_method_cannot_constrain_are_frozen_with_a_warning(
    tokenizer, safety_dataset, reference_dataset, tmp_path, caplog
):
    """The gradient method has no per-expert rule: the experts stay frozen, and the trainer says so."""
    model = build("mixtral", tokenizer, MIXTURE_OF_EXPERTS["mixtral"])
    with caplog.at_level("WARNING", logger="trl_nullspace"):
        make_sft_trainer(model, tokenizer, safety_dataset, tmp_path, reference_dataset, nullspace_method="gradient")
    assert "mixture-of-experts parameters are frozen" in caplog.text
    assert not any(parameter.requires_grad for parameter in model.parameters() if parameter.dim() == 3)


GPT2 = {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128, "n_inner": 128}


LATENT = dict(q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
LATENT_MOE = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, num_key_value_heads=4)
LATENT_ATTENTION = {
    # kv_b_proj sees (batch, 1, sequence, features): one input per head position
    "deepseek_v2": {**LATENT, **LATENT_MOE, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1},
    "deepseek_v3": {**LATENT, **LATENT_MOE, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1},
    # o_a_proj sees (batch, sequence, groups, features); the experts' SwiGLU clamp is active at a limit this
    # low, so their down_proj inputs must come from the module's own gate. (`num_experts` and a routed
    # second layer work around transformers 5.25 reading config.num_experts and router logits for its aux loss.)
    "deepseek_v4": {
        **{key: LATENT[key] for key in ("q_lora_rank", "qk_rope_head_dim")},
        "moe_intermediate_size": 32,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "n_routed_experts": 4,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "o_groups": 2,
        "o_lora_rank": 16,
        "index_n_heads": 2,
        "index_head_dim": 16,
        "index_topk": 8,
        "sliding_window": 8,
        "hc_mult": 2,
        "num_nextn_predict_layers": 0,
        "swiglu_limit": 0.05,
        "mlp_layer_types": ["hash_moe", "moe"],
    },
}


@pytest.mark.parametrize("model_type", sorted(LATENT_ATTENTION))
def test_latent_attention_architecture_keeps_reference_outputs(
    model_type, tokenizer, safety_dataset, reference_dataset, tmp_path
):
    """DeepSeek's multi-head latent attention feeds some Linears 4-D inputs (once a shape error), and
    V4's experts clamp their SwiGLU (once rebuilt without the clamp: 0.15 drift on this model)."""
    extra = LATENT_ATTENTION[model_type]
    model = build(model_type, tokenizer, extra)
    trainer = make_sft_trainer(
        model, tokenizer, safety_dataset, tmp_path, reference_dataset, nullspace_eigenvalue_threshold=1e-10
    )
    constrained = {item.parameter_name for item in trainer.nullspace_projector.constrained}
    assert any(name.endswith("experts.down_proj") for name in constrained)
    assert any(name.endswith(("kv_b_proj.weight", "o_a_proj.weight")) for name in constrained)
    plain_drift = plain_trl_drift(
        model_type, extra, tokenizer, safety_dataset, trainer.nullspace.source.reference_batches, tmp_path
    )
    drift, moved = train_and_measure(trainer)
    assert moved > 1e-2 and plain_drift > 1e-2, (moved, plain_drift)
    assert drift < 1e-3 and drift < plain_drift / 100, (drift, plain_drift)


def test_gpt2_conv1d_keeps_reference_outputs(tokenizer, safety_dataset, reference_dataset, tmp_path):
    """GPT-2's projections are transformers' Conv1D, whose weight is stored transposed (in × out):
    the projection works on its (out × in) view, with both targets (gradient and update)."""
    model = build("gpt2", tokenizer, GPT2)
    trainer = make_sft_trainer(
        model, tokenizer, safety_dataset, tmp_path, reference_dataset, nullspace_eigenvalue_threshold=1e-10
    )
    assert {item.transposed for item in trainer.nullspace_projector.constrained} == {True}
    assert len(trainer.nullspace_projector.constrained) == 8  # c_attn, c_proj, c_fc, mlp c_proj per layer
    plain_drift = plain_trl_drift(
        "gpt2", GPT2, tokenizer, safety_dataset, trainer.nullspace.source.reference_batches, tmp_path
    )
    drift, moved = train_and_measure(trainer)
    assert plain_drift > 1e-2, plain_drift
    assert moved > 1e-2 and drift < 1e-4, (moved, drift)


def gpt2_lora_config() -> LoraConfig:
    return LoraConfig(
        r=4, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, task_type="CAUSAL_LM"
    )


def test_gpt2_lora_keeps_reference_outputs(tokenizer, safety_dataset, reference_dataset, tmp_path):
    """PEFT wraps Conv1D in a LoRA layer whose `A` reads the same inputs: `B A K = 0` holds as for
    Linear, while plain TRL with the same adapter moves the reference logits."""
    trainer = NullSpaceSFTTrainer(
        model=build("gpt2", tokenizer, GPT2),
        args=NullSpaceSFTConfig(**training_kwargs(tmp_path), nullspace_eigenvalue_threshold=1e-10),
        train_dataset=safety_dataset,
        processing_class=tokenizer,
        reference_dataset=reference_dataset,
        peft_config=gpt2_lora_config(),
    )
    assert all(".lora_A." in item.name for item in trainer.nullspace_projector.constrained)
    reference = trainer.nullspace.source.reference_batches
    before = logits_on(trainer.model, reference)
    trainer.train()
    lora_b = [p for n, p in trainer.model.named_parameters() if ".lora_B." in n]
    assert max(p.detach().abs().max().item() for p in lora_b) > 1e-3  # B actually trained
    assert (logits_on(trainer.model, reference) - before).abs().max().item() < 1e-4
    plain = SFTTrainer(
        model=build("gpt2", tokenizer, GPT2),
        args=SFTConfig(**training_kwargs(tmp_path / "plain")),
        train_dataset=safety_dataset,
        processing_class=tokenizer,
        peft_config=gpt2_lora_config(),
    )
    plain_before = logits_on(plain.model, reference)
    plain.train()
    assert (logits_on(plain.model, reference) - plain_before).abs().max().item() > 1e-2


def test_gpt2_is_refused_under_sharded_backends(tokenizer, tmp_path):
    model = build("gpt2", tokenizer, GPT2)
    with pytest.raises(NotImplementedError, match=r"Conv1D layers \(GPT-2 style.*DDP or on one device"):
        args = NullSpaceSFTConfig(**training_kwargs(tmp_path))
        backend_for(args, accelerator_launched_with("deepspeed"), model, "T")


@pytest.mark.parametrize("model_type", ["qwen2", "mixtral"])
def test_estimation_in_passes_is_the_single_pass_estimate_within_its_budget(
    model_type, tokenizer, reference_dataset, monkeypatch
):
    """`nullspace_statistics_budget_gib`: with a budget of one decoder layer's statistics, the layers
    are estimated one pass each, the statistics held at once never exceed the budget (one pass holds
    more), and the subspace is the single pass' (dense and mixture-of-experts)."""
    from trl_nullspace.estimation.activation import InputCovarianceCollector, plan_passes, statistic_bytes
    from trl_nullspace.estimation.reference import tokenize_reference
    from trl_nullspace.projection.targets import find_target_experts, find_target_linears

    model = build(model_type, tokenizer, MIXTURE_OF_EXPERTS.get(model_type, {}))
    batches = tokenize_reference(reference_dataset, tokenizer, batch_size=8, max_length=64)
    linears, experts = find_target_linears(model), find_target_experts(model)
    budget = sum(
        statistic_bytes(name, module) for name, module in {**linears, **experts}.items() if ".layers.0." in name
    )
    assert len(plan_passes(linears, experts, budget)) == 2  # one per decoder layer

    collectors: list[InputCovarianceCollector] = []
    peak = {"bytes": 0}
    original_init, original_accumulate = InputCovarianceCollector.__init__, InputCovarianceCollector._accumulate

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        collectors.append(self)

    def accumulate(self, name, tokens):
        original_accumulate(self, name, tokens)
        held = sum(c.numel() * c.element_size() for collector in collectors for c in collector.covariances.values())
        peak["bytes"] = max(peak["bytes"], held)

    monkeypatch.setattr(InputCovarianceCollector, "__init__", init)
    monkeypatch.setattr(InputCovarianceCollector, "_accumulate", accumulate)
    estimates, peaks = {}, {}
    for name, limit in (("one pass", None), ("passes", budget)):
        collectors.clear()
        peak["bytes"] = 0
        estimates[name] = estimate_activation_subspace(
            model,
            batches,
            linears,
            RankSelection(energy=0.99),
            False,
            True,
            experts=experts,
            statistics_budget_bytes=limit,
        )
        peaks[name] = peak["bytes"]
    assert peaks["passes"] <= budget < peaks["one pass"], peaks
    one, passes = estimates["one pass"], estimates["passes"]
    assert one.targets == passes.targets and one.bases.keys() == passes.bases.keys()
    assert all(torch.allclose(one.bases[key], passes.bases[key], atol=1e-6) for key in one.bases)


@pytest.mark.parametrize("model_type", ["qwen2", "mixtral"])
def test_each_estimation_forward_ends_after_the_last_target_layer(model_type, tokenizer, reference_dataset):
    """With the first decoder layer's targets only, the later layer and the LM head run in the first
    forward pass alone (which learns where the targets end); the statistics are the whole passes'.
    An estimate in one pass per layer learns the order once: the LM head runs in one forward of all."""
    from trl_nullspace.estimation import activation
    from trl_nullspace.estimation.reference import tokenize_reference
    from trl_nullspace.projection.targets import find_target_experts, find_target_linears

    model = build(model_type, tokenizer, MIXTURE_OF_EXPERTS.get(model_type, {}))
    batches = tokenize_reference(reference_dataset, tokenizer, batch_size=1, max_length=64)
    assert len(batches) == 3
    linears = {name: module for name, module in find_target_linears(model).items() if ".layers.0." in name}
    experts = {name: module for name, module in find_target_experts(model).items() if ".layers.0." in name}
    calls = {"layer 1": 0, "lm_head": 0}
    model.model.layers[1].register_forward_hook(lambda *_: calls.__setitem__("layer 1", calls["layer 1"] + 1))
    model.lm_head.register_forward_hook(lambda *_: calls.__setitem__("lm_head", calls["lm_head"] + 1))

    statistics = {}
    for name in ("ended", "whole"):
        collector = activation.InputCovarianceCollector(linears, True, experts)
        order = activation.LayerOrder(model, [*linears, *experts], enabled=name == "ended")
        collector.collect(model, batches, False, layer_order=order)
        statistics[name] = collector.covariances
        if name == "ended":
            assert calls == {"layer 1": 1, "lm_head": 1}, calls
    assert calls == {"layer 1": 4, "lm_head": 4}, calls
    assert statistics["ended"].keys() == statistics["whole"].keys() and statistics["ended"]
    assert all(torch.equal(statistics["ended"][key], statistics["whole"][key]) for key in statistics["whole"])

    calls.update({"layer 1": 0, "lm_head": 0})
    linears, experts = find_target_linears(model), find_target_experts(model)
    budget = sum(  # one layer's statistics: a pass per layer
        activation.statistic_bytes(name, module)
        for name, module in {**linears, **experts}.items()
        if ".layers.0." in name
    )
    passes = activation.collect_in_passes(model, batches, linears, True, experts, budget, False, "")
    assert len([collector.covariances for collector in passes]) == 2
    assert calls == {"layer 1": 1 + 3, "lm_head": 1}, calls  # pass 1's first forward; pass 2's three
