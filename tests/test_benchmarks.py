"""The benchmarks' own measurements: checked on cases whose answer is known."""

import copy

import torch

from benchmarks.tax import general_perplexity_and_kl
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
