"""The reference (general-capability) data: loading, tokenising, batching, fingerprinting."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import datasets
import torch
from transformers import PreTrainedTokenizerBase


@dataclass
class ReferenceBatch:
    """Right-padded token ids; `attention_mask` marks the real tokens the statistics use."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device: torch.device | str) -> ReferenceBatch:
        return ReferenceBatch(self.input_ids.to(device), self.attention_mask.to(device))

    def labels(self) -> torch.Tensor:
        """Causal-LM labels with padding ignored (for the gradient method's reference loss)."""
        return self.input_ids.masked_fill(self.attention_mask == 0, -100)


def reference_texts(dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """One string per example (two for preference pairs), from the columns TRL's trainers accept."""
    columns = set(dataset.column_names)
    if "text" in columns:
        return list(dataset["text"])
    if "messages" in columns:
        return [tokenizer.apply_chat_template(messages, tokenize=False) for messages in dataset["messages"]]
    if {"prompt", "completion"} <= columns:
        return [
            _join(prompt, completion, tokenizer)
            for prompt, completion in zip(dataset["prompt"], dataset["completion"], strict=True)
        ]
    if {"chosen", "rejected"} <= columns:
        prompts = dataset["prompt"] if "prompt" in columns else [""] * len(dataset)
        return [
            _join(prompt, response, tokenizer)
            for prompt, chosen, rejected in zip(prompts, dataset["chosen"], dataset["rejected"], strict=True)
            for response in (chosen, rejected)
        ]
    if "prompt" in columns:  # prompt-only, as GRPO and RLOO take it
        return [
            prompt
            if isinstance(prompt, str)
            else tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            for prompt in dataset["prompt"]
        ]
    raise ValueError(
        f"Dataset has columns {sorted(columns)}; it needs 'text', 'messages', 'prompt' (with 'completion', or "
        "'chosen' and 'rejected', or alone), the formats TRL's SFT, DPO and GRPO trainers accept."
    )


def _join(prompt: str | list[dict], response: str | list[dict], tokenizer: PreTrainedTokenizerBase) -> str:
    """A prompt and its response as one string; conversational ones through the chat template."""
    if isinstance(response, str):
        return prompt + response
    return tokenizer.apply_chat_template((prompt or []) + response, tokenize=False)


def tokenize_reference(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    max_length: int,
    num_samples: int | None = None,
) -> list[ReferenceBatch]:
    """Tokenise and right-pad the reference set into fixed batches, in dataset order."""
    if num_samples is not None:
        dataset = dataset.select(range(min(num_samples, len(dataset))))
    if len(dataset) == 0:
        raise ValueError("The reference dataset is empty: the capability subspace needs reference examples.")
    texts = reference_texts(dataset, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("The tokenizer has neither a pad nor an eos token to pad reference batches with.")
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = [
            tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
            for text in texts[start : start + batch_size]
        ]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        batches.append(ReferenceBatch(input_ids, attention_mask))
    return batches


def reference_fingerprint(batches: list[ReferenceBatch]) -> str:
    """SHA-256 of the exact token ids and masks the statistics were computed from."""
    digest = hashlib.sha256()
    for batch in batches:
        digest.update(batch.input_ids.numpy().tobytes())
        digest.update(batch.attention_mask.numpy().tobytes())
    return digest.hexdigest()
