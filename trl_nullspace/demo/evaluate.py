"""Greedy generation and the demo's metrics: general accuracy, refusal and over-refusal rates."""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trl_nullspace.data import toy
from trl_nullspace.estimation.modes import evaluating
from trl_nullspace.rewards import is_refusal


@torch.no_grad()
def greedy_completions(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int
) -> list[str]:
    """Greedy decoding, batching prompts of equal token length so no padding is needed."""
    by_length: dict[int, list[int]] = defaultdict(list)
    encoded = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    for index, ids in enumerate(encoded):
        by_length[len(ids)].append(index)
    completions = [""] * len(prompts)
    with evaluating(model):
        for indices in by_length.values():
            tokens = torch.tensor([encoded[index] for index in indices])
            prompt_length = tokens.shape[1]
            for _ in range(max_new_tokens):
                next_tokens = model(input_ids=tokens).logits[:, -1].argmax(-1, keepdim=True)
                tokens = torch.cat([tokens, next_tokens], dim=1)
                if (tokens[:, prompt_length:] == tokenizer.eos_token_id).any(dim=1).all():
                    break
            for row, index in enumerate(indices):
                generated = tokens[row, prompt_length:].tolist()
                if tokenizer.eos_token_id in generated:
                    generated = generated[: generated.index(tokenizer.eos_token_id)]
                completions[index] = tokenizer.decode(generated)
    return completions


def general_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[toy.Example]) -> float:
    """Exact-match accuracy on the digit tasks."""
    outputs = greedy_completions(model, tokenizer, [example.prompt for example in examples], max_new_tokens=7)
    return sum(output == example.completion for output, example in zip(outputs, examples, strict=True)) / len(examples)


def refusal_rate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[toy.Example]) -> float:
    """Fraction of prompts whose greedy answer opens with a refusal (`rewards.is_refusal`)."""
    outputs = greedy_completions(
        model, tokenizer, [example.prompt for example in examples], max_new_tokens=len(toy.REFUSAL) + 1
    )
    return sum(is_refusal(output) for output in outputs) / len(examples)
