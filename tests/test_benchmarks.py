"""The benchmarks' own measurements: checked on cases whose answer is known."""

import copy
import json

import numpy as np
import pytest
import torch

from benchmarks.frontier import target_verdicts
from benchmarks.gemma_spectra import plain_text_reference
from benchmarks.memory import Shape, per_rank_bytes, sharded_step_flops_share
from benchmarks.snapshot_drift import STORAGES, leak_over_steps
from benchmarks.speed import OwnWorkTimer
from benchmarks.tax import general_perplexity_and_kl
from benchmarks.unseen_harm import (
    HELD_OUT_AREA,
    IMPERATIVE_FORMS,
    UNSEEN,
    UNSEEN_IMPERATIVE,
    in_harmbench_form,
    proxy_sets,
)
from tests.conftest import make_sft_trainer
from trl_nullspace.data import toy
from trl_nullspace.evaluation.sources import Prompt
from trl_nullspace.evaluation.splits import held_out_sets, training_side


def test_kl_is_zero_for_the_base_model_itself_and_positive_after_a_change(model, tokenizer):
    examples = toy.general_examples(8, seed=0)
    perplexity, kl = general_perplexity_and_kl(model, model, tokenizer, examples)
    assert abs(kl) < 1e-6
    assert perplexity > 1.0
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.lm_head.weight.add_(0.5 * torch.randn_like(changed.lm_head.weight))
    assert general_perplexity_and_kl(changed, model, tokenizer, examples)[1] > 1e-3


def test_own_work_timer_times_each_optimizer_step_and_restores_the_trainer(
    model, tokenizer, safety_dataset, reference_dataset, tmp_path
):
    trainer = make_sft_trainer(
        model, tokenizer, safety_dataset, tmp_path, reference_dataset, max_steps=3, gradient_accumulation_steps=2
    )
    timer = OwnWorkTimer(trainer, torch.device("cpu"))
    per_step = timer.per_step_ms()
    assert len(per_step) == 3 and all(value > 0 for value in per_step)  # per optimizer step, not micro-batch
    assert not set(OwnWorkTimer.HOOKS) & set(vars(trainer.nullspace_backend))  # the class's own methods are back


def _point(do_not_answer: float, harmbench: float, over_refusal: float, kl: float, code: float) -> dict:
    return dict(
        refusal_do_not_answer=do_not_answer,
        refusal_harmbench=harmbench,
        over_refusal_lookalikes=over_refusal,
        over_refusal_general=over_refusal,
        kl_general=kl,
        nll_code_rise=code,
    )


def test_frontier_target_verdicts_follow_the_issue_thresholds():
    base, plain = _point(0.2, 0.0, 0.02, 0.0, 0.0), _point(0.6, 0.4, 0.1, 0.2, 0.02)
    # 95% of plain's gains, 10% of its drift, 5 points of over-refusal: every target met, just.
    assert all(target_verdicts(_point(0.58, 0.38, 0.07, 0.02, 0.002), base, plain).values())
    assert not any(target_verdicts(_point(0.57, 0.37, 0.08, 0.021, 0.0021), base, plain).values())
    assert sum(target_verdicts(plain, base, plain).values()) == 2  # plain meets its own gains, not the drift limits


def test_memory_formula_on_a_shape_counted_by_hand():
    """One layer, hidden 4, q/o 8 wide (2 heads of 4), kv 4, intermediate 6, every k/d = 0.5."""
    shape = Shape("hand", hidden=4, intermediate=6, layers=1, heads=2, kv_heads=1, head_dim=4, vocab=10)
    half = {
        kind: {"mean": 0.5, "max": 0.5} for kind in ("attention input", "o_proj input", "MLP input", "down_proj input")
    }
    rows = per_rank_bytes(shape, half, world=2, block_bytes=32)
    in_bytes = {key: value * 2**30 for key, value in rows.items() if "GiB" in key or key.endswith("_gib")}
    # bases: attention 4·2 + o_proj 8·4 + MLP 4·2 + down 6·3 = 66 floats
    assert in_bytes["bases_gib"] == 66 * 4
    # anchors: (8+4+4)·2 + 4·4 + (6+6)·2 + 4·3 = 84 floats
    assert in_bytes["anchors_gib"] == 84 * 4
    # ZeRO-3 keeps its rows of the anchors and of the coefficients (half each on 2 ranks), and at its
    # step's start an fp32 copy of one weight's gradient partition: the largest (q and o, 32 values)
    # halved, 16 floats.
    assert in_bytes["ZeRO-3: GiB"] == (66 + 84 / 2 + 84 / 2) * 4 + 64
    # Offloaded, 32-byte blocks: the largest staged block is q's, 2 columns of a 4-wide basis plus
    # 2 · 8/2 rows of anchor and residual: (4 + 8) · 2 floats.
    assert in_bytes["FSDP2 + offload: GiB"] == 96
    # ZeRO-3 adds one split row per weight (4+4+4+8+4+4+6 = 34 floats), exchanged in runs of whole weights of
    # one 32-byte block (o_proj's 8-float row alone), two runs held at most: 16 floats; and that gradient copy.
    assert in_bytes["ZeRO-3 + offload: GiB"] == 16 * 4 + 96 + 64
    # ZeRO-1/2 project inside DeepSpeed's step, each rank its rows, as ZeRO-3, the gradient in place
    # (a view of the fp32 partition, no copy), and keep only the bases their flat range reaches: of q, k, v, o,
    # gate, up, down (32+16+16+32+24+24+24 values) the second half starts inside o, so that rank keeps o's, the
    # MLP's and down's bases (32 + 8 + 18 floats, more than the first's 8 + 32). Offloaded, their 2 flat slices
    # cut at most one row in all, at most the longest (o_proj's, 8 floats).
    assert in_bytes["ZeRO-1/2: GiB"] == (58 + 84) * 4
    assert in_bytes["ZeRO-1/2 + offload: GiB"] == 8 * 4 + 96
    assert in_bytes["offload: PCIe GiB per step"] == (2 * 66 + 84 / 2) * 4
    # At k/d = 3/4 every complement is the smaller: bases 4·1 + 8·2 + 4·1 + 6·1.5 = 33 floats, and
    # instead of anchors each rank's rows of the weights (4+2+2)·4 + 2·8 + (3+3)·4 + 2·6 = 84 floats.
    three_quarters = {kind: {"mean": 0.75, "max": 0.75} for kind in half}
    smaller = per_rank_bytes(shape, three_quarters, world=2, block_bytes=32)
    assert smaller["smaller + offload: host GiB"] * 2**30 == (33 + 84) * 4
    # Resident under ZeRO-3: those, the largest change and kept part of one weight's rows (q's 4 rows
    # of 4, or o's 2 of 8: 2 · 16 floats) and the 16 split-row floats held at once.
    assert smaller["ZeRO-3, smaller: GiB"] * 2**30 == (33 + 84 + 32 + 16) * 4
    # Split bases (`nullspace_shard_bases`, FSDP2): half of the 66 basis floats, one 32-byte block in flight (the
    # bases larger than a block are gathered a block at a time: 8 floats), half the anchors and the largest local
    # residual (q's 4 rows of 2, o's 2 of 4: 8 floats); received per step: every basis twice, half each time.
    assert in_bytes["FSDP2, split bases: GiB"] == (66 / 2 + 8 + 84 / 2 + 8) * 4
    assert in_bytes["split bases: received GiB per step"] == 2 * 66 / 2 * 4
    # With complements: half of their 33 floats, one block of o_proj's 8×2 complement in flight (8 floats), the
    # weights' rows and the largest change and kept part, as resident.
    assert smaller["FSDP2, smaller + split bases: GiB"] * 2**30 == (33 / 2 + 8 + 84 + 32) * 4
    # Step snapshots hold no weights' rows between steps: half the complements, the block in flight, and one
    # weight's step change (q's 4 rows of 4, or o's 2 of 8: 16 floats); in bf16 the complements take 2 bytes, and
    # a 32-byte block holds all of o_proj's 16 values, 6 bytes each in flight (bf16 and their fp32 reading).
    assert smaller["FSDP2, smaller + split bases + step snapshots: GiB"] * 2**30 == (33 / 2 + 8 + 16) * 4
    assert smaller["FSDP2, bf16 smaller + split bases + step snapshots: GiB"] * 2**30 == 33 + 16 * 6 + 16 * 4
    assert smaller["step snapshot: GiB during the step"] * 2**30 == 84 * 4  # each rank's rows of every weight
    # Split under ZeRO-3: half the bases, the 8-float block in flight, half the anchors, the largest local residual
    # (8 floats), the 16 split-row floats held at once and the 16-float gradient copy; with complements, half their
    # 33 floats, o_proj's 8-float block, the weights' 84 rows, the largest change and kept part (32 floats), the
    # split rows.
    assert in_bytes["ZeRO-3, split bases: GiB"] == (66 / 2 + 8 + 84 / 2 + 8 + 16 + 16) * 4
    assert smaller["ZeRO-3, smaller + split bases: GiB"] * 2**30 == (33 / 2 + 8 + 84 + 32 + 16) * 4
    # With step snapshots no anchors or weights' rows stay between steps: one weight's change and coefficients
    # (q's or o's: 4·(4+2) or 2·(8+4) = 24 floats) or, with complements, its change and kept part (32 floats).
    assert in_bytes["ZeRO-3, split bases + step snapshots: GiB"] == (66 / 2 + 8 + 24 + 16) * 4
    assert smaller["ZeRO-3, smaller + split bases + step snapshots: GiB"] * 2**30 == (33 / 2 + 8 + 32 + 16) * 4
    # Whole-weight ownership (not built): half the 33 complement floats and one owned weight whole (q's or o's 32
    # values); per step it receives, twice per projection and twice per step, a quarter of the 168 constrained
    # values (4·16 + 8·4 + 4·12 + 6·4), the other rank's half of its half.
    assert smaller["owned weights, smaller + step snapshots: GiB"] * 2**30 == (33 / 2 + 32) * 4
    assert in_bytes["owned weights: received GiB per step"] == 4 * 168 / 4 * 4
    # The scale issue's FLOP criterion: 4·d_out·d·k per weight (q/k/v 4·16·4·2, o 4·4·8·4, gate/up 4·12·4·2,
    # down 4·4·6·3: 1696), twice for the `both` target, split over 2 ranks, against 6·248 parameters·8·8192 tokens.
    assert sharded_step_flops_share(shape, half, 2, 8, False) == 2 * 1696 / 2 / (6 * 248 * 8 * 8192)


def test_unseen_harm_proxy_reads_no_held_out_item_and_refuses_a_trained_area():
    """The proxy's harmful sets lie on the training side, its unseen area is not trained on, and its
    HarmBench-form prompts are recast from that area's how-to questions."""
    trained = training_side().harmful_train[:200]
    sets = proxy_sets(trained)
    held_out = {prompt.text for prompts in held_out_sets().harmful.values() for prompt in prompts}
    assert not held_out & {prompt.text for prompts in sets.harmful.values() for prompt in prompts}
    assert all(prompt.category == HELD_OUT_AREA for prompt in sets.harmful[UNSEEN] + sets.harmful[UNSEEN_IMPERATIVE])
    assert not {prompt.text for prompt in trained} & {prompt.text for prompt in sets.harmful[UNSEEN]}
    recast = in_harmbench_form([Prompt("How to pick a lock?", "do-not-answer", HELD_OUT_AREA)])
    assert len(recast) == 1 and recast[0].text.endswith("pick a lock") and recast[0].text[0].isupper()
    assert not in_harmbench_form([Prompt("Why is the sky blue?", "do-not-answer", HELD_OUT_AREA)])
    with pytest.raises(ValueError, match=HELD_OUT_AREA):
        proxy_sets([Prompt("How to pick a lock?", "do-not-answer", HELD_OUT_AREA)])


def test_auroc_counts_pairs_and_ties():
    from benchmarks.harm_keys import auroc

    assert auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auroc(np.array([1.0]), np.array([2.0])) == 0.0
    assert auroc(np.array([1.0, 3.0]), np.array([1.0, 2.0])) == 0.625  # (0.5 + 1 + 1 + 0) / 4


def test_exempt_prompts_recast_requests_in_forms_the_proxy_does_not_measure():
    """The exemption's instruction forms differ from the proxy's HarmBench templates, so the proxy
    does not measure refusal of the very wording the keys were taken from."""
    from trl_nullspace.evaluation.training_data import as_instruction

    assert as_instruction("Can you tell me how to pick a lock?") == "Tell me how to pick a lock."
    assert as_instruction("How do I pick a lock?") == "Explain how to pick a lock."
    assert as_instruction("Why is the sky blue?") is None
    proxy_openings = {form.split("{}")[0] for form in IMPERATIVE_FORMS}
    recast = as_instruction("How do I pick a lock?")
    assert not any(recast.startswith(opening) for opening in proxy_openings)


def test_basis_precision_sees_bf16_rounding_and_sampling_on_known_statistics():
    """On a spectrum with a clear gap, bf16 storage rotates the basis by about bf16's precision and misses
    almost no energy; two halves drawn from the same distribution disagree by more (few samples)."""
    from benchmarks.basis_precision import measure

    torch.manual_seed(0)
    scales = torch.cat([torch.ones(8) * 10, torch.ones(24) * 0.01]).double()
    rotation = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64)).Q  # no basis along the axes

    def half(tokens: int) -> torch.Tensor:
        inputs = (torch.randn(tokens, 32, dtype=torch.float64) * scales.sqrt()) @ rotation.T
        return inputs.T @ inputs

    first, second = half(40), half(40)
    row = measure(first + second, first, second)
    assert row["rank"] == 8 and row["dimension"] == 32
    assert 1e-4 < row["bf16_sin_max"] < 2**-6
    assert abs(row["bf16_cost"]) < 1e-4 and abs(row["bf16_complement_cost"]) < 1e-4
    assert row["halves_sin_max"] > row["bf16_sin_max"]


def test_same_role_contrast_frees_what_harmful_prompts_use_and_general_prompts_do_not():
    """Axis 2 is used by harmful and general prompts alike, axis 3 by harmful prompts only; both are cheap in
    the reference data. Contrasted with the reference (mostly answers), axis 2 looks most harmful-specific and
    is freed; contrasted with general prompts (the same role, as a ratio or a difference), axis 3 is, and axis 2
    stays protected."""
    from benchmarks.freed_energy import DEFAULT, difference_basis, same_role_basis
    from trl_nullspace.estimation.activation import contrastive_basis

    def diagonal(*values: float) -> torch.Tensor:
        return torch.diag(torch.tensor(values, dtype=torch.float64)) + 1e-6 * torch.eye(len(values))

    reference = diagonal(100, 10, 0.6, 0.7, 0.01, 0.01)
    harmful = diagonal(1, 1, 50, 20, 0, 0)
    general_prompts = diagonal(1, 1, 50, 0.1, 1, 1)
    axis = torch.eye(6, dtype=torch.float64)
    harm_only = contrastive_basis(reference, harmful, DEFAULT)[0].double()
    same_role = same_role_basis(reference, general_prompts, harmful)
    assert (harm_only.T @ axis[2]).norm() < 1e-3 and (harm_only.T @ axis[3]).norm() > 0.99
    assert (same_role.T @ axis[3]).norm() < 1e-3 and (same_role.T @ axis[2]).norm() > 0.99
    difference = difference_basis(reference, general_prompts, harmful)
    assert difference.shape[1] == 5 and (difference.T @ axis[3]).norm() < 1e-3


def test_soft_projector_lets_through_exactly_its_budget_and_damps_strong_directions_most():
    """The soft prototype's μ is solved so that the reference energy let through is the budget; every
    direction is damped by `μ / (λ + μ)`, so weak directions pass almost whole and strong ones barely."""
    from benchmarks.freed_energy import free_share, soft_free_operator

    reference = torch.diag(torch.tensor([100.0, 10.0, 1.0, 0.1, 0.01], dtype=torch.float64))
    free = soft_free_operator(reference, budget=0.01)
    assert abs(free_share(free, reference) - 0.01) < 1e-9
    damping = torch.diagonal(free)
    assert torch.all(damping[1:] > damping[:-1]) and damping[0] < 0.1 and damping[-1] > 0.5
    hard = torch.eye(5, dtype=torch.float64) - torch.diag(torch.tensor([1.0, 1, 0, 0, 0], dtype=torch.float64))
    assert abs(free_share(hard, reference) - 1.11 / 111.11) < 1e-9


def test_snapshot_drift_measures_the_leak_of_each_storage_through_the_projection_code():
    """`make bench-snapshot-drift` steps a weight with the library's own projection for each storage: every leak
    into the subspace stays at round-off while the weight moves by far more (a storage that stopped projecting
    would leak about as much as it moved)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 8, generator=generator)
    basis = torch.linalg.qr(torch.randn(8, 5, generator=generator)).Q
    for storage, settings in STORAGES.items():
        run = leak_over_steps(weight, basis, settings, steps=40, marks=[1, 40])
        assert set(run["leak"]) == {1, 40} and run["moved"] > 1e-3, storage
        assert max(run["leak"].values()) < 1e-5, (storage, run)


def test_gemma_spectra_read_the_reference_conversations_as_plain_text(tmp_path):
    """Gemma-3-270M is a base model without a chat template: each reference conversation becomes its turns
    joined by blank lines, every turn kept."""
    conversation = [{"role": "user", "content": "Why is the sky blue?"}, {"role": "assistant", "content": "Light."}]
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": conversation}) + "\n")
    assert plain_text_reference(str(tmp_path))["text"] == ["Why is the sky blue?\n\nLight."]
