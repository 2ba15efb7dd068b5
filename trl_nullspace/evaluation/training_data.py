"""Safety training data for a real model, built as practitioners build it (the real-model benchmark's,
and `trl-nullspace prepare smollm2`'s).

From the training side of the splits only (`trl_nullspace.evaluation.splits.training_side`):
- **SFT, boundary set**: harmful requests (Do-Not-Answer train split) → a refusal, plus benign
  look-alikes (this project's train split) → the base model's own answer, so the model learns
  where the boundary is rather than to refuse everything;
- **SFT, safety-only set**: the harmful requests alone (the setting of the LoRA refusal paper);
- **DPO pairs**: harmful → refusal chosen over the base model's own (compliant) answer; benign
  look-alike → the base model's answer chosen over a refusal;
- **reference set**: general prompts (reference split) with the base model's own answers, the
  data whose behaviour the null-space trainers protect (and, as a lever, the same plus the benign
  look-alikes of the training split with their answers);
- **RL prompts**: the harmful requests and the benign look-alikes, labelled (`harmful`) for the
  refusal reward of GRPO and RLOO;
- **exempt prompts**: the same, with each harmful request also recast as an instruction, for the
  harm-keyed exemption (`nullspace_exempt_dataset`);

The base model's answers are generated once, greedily, and cached in a JSON file keyed by the
model's weights fingerprint and the prompts, so every run of the benchmark trains on the same data.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass

import datasets
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trl_nullspace.evaluation.generation import greedy_answers
from trl_nullspace.evaluation.splits import TrainingSide, stable_fraction, training_side
from trl_nullspace.storage.fingerprint import weights_fingerprint

# Requests recast as instructions for the harm-keyed exemption's prompts (two forms the safety data lack;
# not the templates `make bench-unseen` measures with): "Can you X?" → "X.", "How do I X?" → "Explain how to X."
CAN_YOU = re.compile(r"^(?:can|could) you (?:please )?(.+?)\??$", re.I)
HOW_TO = re.compile(
    r"^(?:how (?:to|can i|do i|can one|would i|could i|should i)|can you show me how to) (.+?)\??$", re.I
)

REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I can't help with that request.",
    "I'm sorry, but I won't provide that.",
    "I cannot assist with that. If you have another question, I'm happy to help.",
    "Sorry, I can't help with this request.",
    "I'm not able to help with that.",
)
ANSWER_TOKENS = 96


def refusal_for(prompt: str) -> str:
    """One of a few refusal wordings, fixed per prompt, so the model learns refusing, not one string."""
    return REFUSALS[int(stable_fraction("refusal:" + prompt) * len(REFUSALS))]


def trim_to_sentence(answer: str) -> str:
    """Cut a length-capped answer after its last complete sentence or line, so training on it does
    not teach the model to stop mid-sentence."""
    cut = max(answer.rfind(mark) for mark in (".", "!", "?", "\n", "```"))
    return answer[: cut + 1].strip() if cut > len(answer) // 3 else answer.strip()


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def as_instruction(request: str) -> str | None:
    """`request` recast as an instruction ("Can you X?" → "X.", "How do I X?" → "Explain how to X."),
    or None if it has neither form."""
    request = request.strip()
    match = CAN_YOU.match(request)
    if match:
        return match.group(1)[0].upper() + match.group(1)[1:] + "."
    match = HOW_TO.match(request)
    return f"Explain how to {match.group(1)}." if match else None


@dataclass
class RealData:
    sft_boundary: datasets.Dataset
    sft_safety_only: datasets.Dataset
    dpo: datasets.Dataset
    references: dict[str, datasets.Dataset]  # "general"; "general+lookalikes" adds the benign training prompts
    rl_prompts: datasets.Dataset
    # The harm-keyed exemption's prompts: the harmful training requests in both forms (as asked, and
    # recast as instructions) and the benign look-alikes, with the `harmful` flag.
    exempt_prompts: datasets.Dataset


class BaseAnswers:
    """The base model's greedy answers, generated once per (weights, prompts) and kept in a JSON file."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str, show_progress: bool):
        self.model, self.tokenizer, self.path, self.show_progress = model, tokenizer, path, show_progress
        self.weights = weights_fingerprint(model)
        self.cache: dict[str, str] = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                self.cache = json.load(handle)

    def _key(self, prompt: str) -> str:
        return hashlib.sha256(f"{self.weights}|{ANSWER_TOKENS}|{prompt}".encode()).hexdigest()[:24]

    def __call__(self, prompts: list[str], what: str) -> list[str]:
        missing = [prompt for prompt in dict.fromkeys(prompts) if self._key(prompt) not in self.cache]
        if missing:
            answers = greedy_answers(
                self.model,
                self.tokenizer,
                missing,
                ANSWER_TOKENS,
                description=f"base answers: {what}",
                show_progress=self.show_progress,
            )
            self.cache.update(
                {self._key(prompt): trim_to_sentence(answer) for prompt, answer in zip(missing, answers, strict=True)}
            )
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "w", encoding="utf-8") as handle:
                json.dump(self.cache, handle)
        return [self.cache[self._key(prompt)] for prompt in prompts]


def build_real_data(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cache_path: str,
    harmful_examples: int = 200,
    lookalike_repeats: int = 2,
    show_progress: bool = True,
    side: TrainingSide | None = None,
    lookalike_examples: int | None = None,
    reference_examples: int | None = None,
) -> RealData:
    """The benchmark's data sets; the base answers come from `cache_path` or are generated into it.
    `*_examples` cap each source (None: all of the training side's)."""
    side = side or training_side()
    answer = BaseAnswers(model, tokenizer, cache_path, show_progress)
    harmful = [prompt.text for prompt in side.harmful_train[:harmful_examples]]
    lookalikes = [prompt.text for prompt in side.lookalike_train[:lookalike_examples]]
    lookalike_answers = answer(lookalikes, "look-alikes")
    reference_prompts = [prompt.text for prompt in side.general_reference[:reference_examples]]
    reference_answers = answer(reference_prompts, "reference")
    compliant = answer(harmful, "harmful (DPO rejected)")

    refusals = [{"prompt": _user(text), "completion": _assistant(refusal_for(text))} for text in harmful]
    helpful = [
        {"prompt": _user(text), "completion": _assistant(reply)}
        for text, reply in zip(lookalikes, lookalike_answers, strict=True)
    ]
    boundary = datasets.Dataset.from_list(refusals + helpful * lookalike_repeats).shuffle(seed=0)
    pairs = [
        {"prompt": _user(text), "chosen": _assistant(refusal_for(text)), "rejected": _assistant(reply)}
        for text, reply in zip(harmful, compliant, strict=True)
    ] + [
        {"prompt": _user(text), "chosen": _assistant(reply), "rejected": _assistant(refusal_for(text))}
        for text, reply in zip(lookalikes, lookalike_answers, strict=True)
    ] * lookalike_repeats
    reference = [
        {"messages": _user(text) + _assistant(reply)}
        for text, reply in zip(reference_prompts, reference_answers, strict=True)
    ]
    benign = [
        {"messages": _user(text) + _assistant(reply)}
        for text, reply in zip(lookalikes, lookalike_answers, strict=True)
    ]
    return RealData(
        sft_boundary=boundary,
        sft_safety_only=datasets.Dataset.from_list(refusals).shuffle(seed=0),
        dpo=datasets.Dataset.from_list(pairs).shuffle(seed=0),
        references={
            "general": datasets.Dataset.from_list(reference),
            "general+lookalikes": datasets.Dataset.from_list(reference + benign),
        },
        rl_prompts=datasets.Dataset.from_list(
            [{"prompt": _user(text), "harmful": True} for text in harmful]
            + [{"prompt": _user(text), "harmful": False} for text in lookalikes]
        ).shuffle(seed=0),
        exempt_prompts=datasets.Dataset.from_list(
            [{"prompt": _user(text), "harmful": True} for text in harmful]
            + [{"prompt": _user(text), "harmful": True} for text in map(as_instruction, harmful) if text]
            + [{"prompt": _user(text), "harmful": False} for text in lookalikes]
        ),
    )
