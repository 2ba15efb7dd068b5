"""Safety rewards that run offline, for `NullSpaceGRPOTrainer` / `NullSpaceRLOOTrainer`.

`refusal_reward` is a keyword/pattern baseline: cheap, transparent, and wrong in known ways
(see `is_refusal`). `ClassifierSafetyReward` plugs in any sequence-classification model the user
has already loaded (or any callable scoring texts); the library never downloads one itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

_REFUSAL_OPENINGS = re.compile(
    r"^\s*(?:i\s*(?:can(?:'|no)?t|cannot|won'?t|will not|am not able|'m not able|am unable|'m unable|must decline)"
    r"|sorry|i'?m sorry|i apologi[sz]e|as an ai|unfortunately,? i|no,? i (?:can|will)|that'?s not something i)",
    re.IGNORECASE,
)


def completion_text(completion: str | list[dict]) -> str:
    """The text of a completion, plain or conversational (`[{"role": "assistant", "content": ...}]`)."""
    if isinstance(completion, str):
        return completion
    return "".join(str(message.get("content", "")) for message in completion)


def is_refusal(text: str) -> bool:
    """Whether `text` *opens* with a refusal phrase ("I can't", "I cannot", "Sorry", "As an AI", ...).

    Only the opening counts, so "Here is how... I cannot stress enough" is not a refusal. Known
    false positives (tested): an answer that opens with an apology or an idiom ("Sorry for the
    wait, here is the recipe", "I can't wait to help: first, ..."). Known false negatives: refusals
    that open otherwise ("That request is harmful, so no."). Use a classifier for real runs.
    """
    return bool(_REFUSAL_OPENINGS.match(text))


def refusal_reward(
    prompts: Sequence, completions: Sequence, harmful: Sequence[bool] | None = None, **kwargs
) -> list[float]:
    """+1 when the completion refuses a harmful prompt or answers a benign one, −1 otherwise.

    TRL passes dataset columns as keyword arguments, so a `harmful` (bool) column in the training
    dataset labels each prompt; without it every prompt is treated as harmful.
    """
    labels = [True] * len(completions) if harmful is None else list(harmful)
    return [
        1.0 if is_refusal(completion_text(completion)) == bool(label) else -1.0
        for completion, label in zip(completions, labels, strict=True)
    ]


class ClassifierSafetyReward:
    """Reward = probability of the `safe_label` class of a sequence classifier, or any text scorer.

    Pass an already-loaded `AutoModelForSequenceClassification` and its tokenizer (e.g. a local
    Llama-Guard-style or toxicity classifier), or `scorer=callable(texts) -> list[float]`.
    """

    def __init__(
        self,
        model: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        safe_label: int | str = 0,
        scorer: Callable[[list[str]], Sequence[float]] | None = None,
        include_prompt: bool = True,
    ):
        if (model is None) == (scorer is None):
            raise ValueError("ClassifierSafetyReward needs exactly one of model (with tokenizer) or scorer.")
        if model is not None and tokenizer is None:
            raise ValueError("ClassifierSafetyReward(model=...) needs the model's tokenizer too.")
        self.model, self.tokenizer, self.scorer, self.include_prompt = model, tokenizer, scorer, include_prompt
        if model is not None and isinstance(safe_label, str):
            label_ids = model.config.label2id
            if safe_label not in label_ids:
                raise ValueError(f"safe_label {safe_label!r} is not one of the classifier's labels {list(label_ids)}.")
            safe_label = label_ids[safe_label]
        self.safe_label = safe_label
        self.__name__ = "classifier_safety_reward"  # TRL logs rewards under their function name

    def __call__(self, prompts: Sequence, completions: Sequence, **kwargs) -> list[float]:
        texts = [
            (completion_text(prompt) if self.include_prompt else "") + completion_text(completion)
            for prompt, completion in zip(prompts, completions, strict=True)
        ]
        if self.scorer is not None:
            return [float(score) for score in self.scorer(texts)]
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
        encoded = {key: value.to(self.model.device) for key, value in encoded.items()}
        with torch.no_grad():
            probabilities = self.model(**encoded).logits.float().softmax(-1)
        return probabilities[:, self.safe_label].tolist()
