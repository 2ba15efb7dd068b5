"""What a TRL user would do instead of a constraint, as benchmark rows: replay and a KL retain loss.

A user who fears the alignment tax and has general data at hand has two common choices, each a
few lines around plain TRL (the retain loss also serves the null-space trainer, as a catch for what
a looser constraint lets through):
- **replay**: mix the general data into the safety training data (`with_replay`);
- **a retain loss**: add a KL term to the base model on general answers (`RetainKLSFTTrainer`).

Both get the benchmark's data and budget (steps, batch, optimizer); the general data are the
null-space trainer's reference data, so every method sees the same general examples.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import datasets
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl import SFTTrainer

from trl_nullspace import NullSpaceSFTTrainer
from trl_nullspace.estimation.modes import evaluating

RETAIN_TOP_K = 32  # base log-probabilities kept per answer token (the rest as one "tail" outcome)


def with_replay(train_dataset: datasets.Dataset, general: datasets.Dataset) -> datasets.Dataset:
    """`train_dataset` (conversational prompt/completion) with every `general` example (conversational
    `messages`, the last one the answer) mixed in, shuffled: replay of the general data."""
    replayed = [{"prompt": example[:-1], "completion": example[-1:]} for example in general["messages"]]
    mixed = datasets.concatenate_datasets(
        [train_dataset.select_columns(["prompt", "completion"]), datasets.Dataset.from_list(replayed)]
    )
    return mixed.shuffle(seed=0)


@dataclass
class RetainBatch:
    """Right-padded general examples and, at each answer token, the base model's top log-probabilities.

    `positions` marks the logits that predict answer tokens; `top_ids`/`top_log_probs` hold the base
    model's `RETAIN_TOP_K` most likely next tokens there (tokens × K), computed once before training,
    so no second model is held."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    top_ids: torch.Tensor
    top_log_probs: torch.Tensor


def retain_batches(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, general: datasets.Dataset, batch_size: int
) -> list[RetainBatch]:
    """`general`'s conversations in batches, each with the (untrained) `model`'s top-K log-probs of its answers."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    batches = []
    for start in range(0, len(general), batch_size):
        rows = []
        for messages in general["messages"][start : start + batch_size]:
            context = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            whole = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
            rows.append((whole["input_ids"], len(tokenizer(context, add_special_tokens=False)["input_ids"])))
        width = max(len(whole) for whole, _ in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        positions = torch.zeros_like(input_ids, dtype=torch.bool)
        for row, (whole, answer_start) in enumerate(rows):
            input_ids[row, : len(whole)] = torch.tensor(whole)
            attention_mask[row, : len(whole)] = 1
            positions[row, answer_start - 1 : len(whole) - 1] = True  # logits predicting the answer's tokens
        with evaluating(model), torch.no_grad():
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        top_log_probs, top_ids = F.log_softmax(logits.float()[positions.to(device)], dim=-1).topk(RETAIN_TOP_K)
        batches.append(RetainBatch(input_ids, attention_mask, positions, top_ids.cpu(), top_log_probs.cpu()))
    return batches


def top_k_kl(base_top_log_probs: torch.Tensor, log_probs: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(base ‖ model) over the base model's top-K tokens plus one outcome for the rest:
    the KL of the two distributions coarsened to those K+1 outcomes (a lower bound of the full KL,
    equal to it as K grows)."""
    model_top = log_probs.gather(-1, top_ids)
    base_tail = (1 - base_top_log_probs.exp().sum(-1)).clamp_min(1e-8)
    model_tail = (1 - model_top.exp().sum(-1)).clamp_min(1e-8)
    kl = (base_top_log_probs.exp() * (base_top_log_probs - model_top)).sum(-1)
    kl = kl + base_tail * (base_tail.log() - model_tail.log())
    return kl.mean()


class RetainKLMixin:
    """A trainer with `retain_weight` × KL(base ‖ model) on general answers added to each step's loss:
    the retain loss a user can add to plain TRL (`RetainKLSFTTrainer`), or to the null-space trainer
    to catch the drift a looser constraint lets through (`RetainKLNullSpaceSFTTrainer`, the frontier
    issue's lever 4). The base side is cached before training (`retain_batches`); one general batch
    per step, cycling."""

    def __init__(self, *args, retain_dataset: datasets.Dataset, retain_weight: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.retain_weight = retain_weight
        self._retain = itertools.cycle(
            retain_batches(self.model, self.processing_class, retain_dataset, self.args.per_device_train_batch_size)
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        batch = next(self._retain)
        device = self.accelerator.device
        logits = model(
            input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False
        ).logits
        log_probs = F.log_softmax(logits.float()[batch.positions.to(device)], dim=-1)
        retain = self.retain_weight * top_k_kl(batch.top_log_probs.to(device), log_probs, batch.top_ids.to(device))
        if return_outputs:
            loss, outputs = result
            return loss + retain, outputs
        return result + retain


class RetainKLSFTTrainer(RetainKLMixin, SFTTrainer):
    """TRL's `SFTTrainer` with the KL retain loss (`RetainKLMixin`)."""


class RetainKLNullSpaceSFTTrainer(RetainKLMixin, NullSpaceSFTTrainer):
    """`NullSpaceSFTTrainer` with the KL retain loss (`RetainKLMixin`)."""
