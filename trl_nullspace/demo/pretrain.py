"""Give a tiny random model a measurable general skill before safety training."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trl_nullspace.data import toy


def encode_for_training(examples: list[toy.Example], tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion+eos, with loss on the completion only."""
    rows, prompt_lengths = [], []
    for example in examples:
        rows.append(tokenizer(example.prompt + example.completion)["input_ids"] + [tokenizer.eos_token_id])
        prompt_lengths.append(len(tokenizer(example.prompt)["input_ids"]))
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, (row, prompt_length) in enumerate(zip(rows, prompt_lengths, strict=True)):
        input_ids[index, : len(row)] = torch.tensor(row)
        attention_mask[index, : len(row)] = 1
        labels[index, prompt_length : len(row)] = torch.tensor(row[prompt_length:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pretrain_general_skill(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    steps: int,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    seed: int = 0,
) -> list[float]:
    """Train on freshly generated digit tasks (one-cycle AdamW); returns the loss curve."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1)
    model.train()
    losses = []
    for step in range(steps):
        batch = encode_for_training(toy.general_examples(batch_size, seed=10_000 * (seed + 1) + step), tokenizer)
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses
