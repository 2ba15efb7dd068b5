"""Greedy chat answers and teacher-forced log-probabilities, batched, for evaluation.

Both go through the tokenizer's chat template, as a user of the instruct model would: a prompt is
one user turn and the answer is what follows the template's generation prompt. Answers are
greedy, so every evaluation is deterministic and two models can be compared answer by answer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trl_nullspace.estimation.modes import evaluating


def chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """`prompt` as one user turn, followed by the template's generation prompt."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def _length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length, so little compute goes to padding."""
    order = sorted(range(len(lengths)), key=lambda index: lengths[index])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("The tokenizer has neither a pad nor an eos token to pad batches with.")
    return pad


@torch.no_grad()
def greedy_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 32,
    description: str = "answers",
    show_progress: bool = True,
) -> list[str]:
    """The model's greedy answer to each prompt (at most `max_new_tokens` tokens, special tokens removed)."""
    encoded = [tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"] for prompt in prompts]
    pad = _pad_token_id(tokenizer)
    device = next(model.parameters()).device
    answers = [""] * len(prompts)
    batches = list(_length_sorted_batches([len(ids) for ids in encoded], batch_size))
    with evaluating(model):
        for indices in tqdm(batches, desc=description, disable=not show_progress, leave=False):
            width = max(len(encoded[index]) for index in indices)
            input_ids = torch.full((len(indices), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
            for row, index in enumerate(indices):  # left padding: every answer starts at `width`
                ids = encoded[index]
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                temperature=None,
                top_p=None,
                top_k=None,
            )
            for row, index in enumerate(indices):
                answers[index] = tokenizer.decode(generated[row, width:], skip_special_tokens=True).strip()
    return answers


@dataclass
class TeacherForced:
    """Contexts and the continuations whose tokens are scored, as token ids."""

    contexts: list[list[int]]
    continuations: list[list[int]]

    @classmethod
    def from_texts(
        cls, tokenizer: PreTrainedTokenizerBase, contexts: Sequence[str], continuations: Sequence[str]
    ) -> TeacherForced:
        """Context and continuation are tokenised apart, so both models score the very same tokens."""
        return cls(
            [tokenizer(text, add_special_tokens=False)["input_ids"] for text in contexts],
            [tokenizer(text, add_special_tokens=False)["input_ids"] for text in continuations],
        )

    def batches(
        self, batch_size: int, pad: int
    ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(indices, input_ids, attention_mask, scored) per batch; `scored[b, t]` marks the positions
        whose next-token distribution predicts a continuation token."""
        lengths = [len(c) + len(x) for c, x in zip(self.contexts, self.continuations, strict=True)]
        for indices in _length_sorted_batches(lengths, batch_size):
            width = max(lengths[index] for index in indices)
            input_ids = torch.full((len(indices), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
            scored = torch.zeros((len(indices), width), dtype=torch.bool)
            for row, index in enumerate(indices):  # right padding
                context, continuation = self.contexts[index], self.continuations[index]
                ids = context + continuation
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention_mask[row, : len(ids)] = 1
                scored[row, max(len(context) - 1, 0) : len(ids) - 1] = True
            yield indices, input_ids, attention_mask, scored


@torch.no_grad()
def scored_log_probs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: TeacherForced,
    batch_size: int = 8,
    description: str = "log-probs",
    show_progress: bool = True,
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Per batch: (indices, log-softmax at the scored positions [n, vocab] in fp32, their targets [n]).

    Batches come in length order, the same for every model given the same `data`; the row of each
    scored position is its example's index in `indices`.
    """
    device = next(model.parameters()).device
    batches = list(data.batches(batch_size, _pad_token_id(tokenizer)))
    with evaluating(model):
        for indices, input_ids, attention_mask, scored in tqdm(
            batches, desc=description, disable=not show_progress, leave=False
        ):
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            targets = input_ids[:, 1:][scored[:, :-1]]
            log_probs = logits[:, :-1][scored[:, :-1].to(device)].float().log_softmax(-1).cpu()
            yield indices, log_probs, targets
