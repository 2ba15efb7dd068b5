"""The benchmarks' own measurements: checked on cases whose answer is known."""

import copy

import torch

from benchmarks.frontier import target_verdicts
from benchmarks.speed import OwnWorkTimer
from benchmarks.tax import general_perplexity_and_kl
from tests.conftest import make_sft_trainer
from trl_nullspace import toy


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
    assert not set(OwnWorkTimer.HOOKS) & set(vars(trainer))  # the class's own methods are back


def test_frontier_target_verdicts_follow_the_issue_thresholds():
    base = dict(
        refusal_do_not_answer=0.2,
        refusal_harmbench=0.0,
        over_refusal_lookalikes=0.02,
        kl_general=0.0,
        nll_code_rise=0.0,
    )
    plain = dict(
        refusal_do_not_answer=0.6,
        refusal_harmbench=0.4,
        over_refusal_lookalikes=0.1,
        kl_general=0.2,
        nll_code_rise=0.02,
    )
    # 95% of plain's gains, 10% of its drift, 5 points of over-refusal: every target met, just.
    at_the_edge = dict(
        refusal_do_not_answer=0.58,
        refusal_harmbench=0.38,
        over_refusal_lookalikes=0.07,
        kl_general=0.02,
        nll_code_rise=0.002,
    )
    assert all(target_verdicts(at_the_edge, base, plain).values())
    over_the_edge = dict(
        refusal_do_not_answer=0.57,
        refusal_harmbench=0.37,
        over_refusal_lookalikes=0.08,
        kl_general=0.021,
        nll_code_rise=0.0021,
    )
    assert not any(target_verdicts(over_the_edge, base, plain).values())
    assert sum(target_verdicts(plain, base, plain).values()) == 2  # plain meets its own gains, not the drift limits
