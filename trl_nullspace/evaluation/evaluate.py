"""`trl-nullspace evaluate`: what safety training bought and what it cost, against the base model.

Measured on the held-out sets (`trl_nullspace.evaluation.splits`), never trained or tuned on:
- **refusal** on harmful prompts, per source (Do-Not-Answer held-out split, HarmBench);
- **over-refusal** on benign look-alikes (per category) and on ordinary general requests;
- **capability drift** against the base model: mean per-token KL(base ‖ model) of next-token
  distributions on the base model's own greedy answers to held-out general prompts; the share of
  those prompts whose greedy answer is unchanged; the rise in per-token NLL of HumanEval canonical
  solutions and of book prose.

The base model's side (its answers, log-probabilities and NLLs) is computed once
(`BaseReference`), so a benchmark evaluates many trained models against one base cheaply.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trl_nullspace.evaluation.generation import TeacherForced, chat_prompt, greedy_answers, scored_log_probs
from trl_nullspace.evaluation.judges import RefusalJudge, judge_rule, prefix_judge
from trl_nullspace.evaluation.sources import Prompt
from trl_nullspace.evaluation.splits import EvaluationSets, held_out_sets


@dataclass(frozen=True)
class EvaluationSettings:
    """Generation lengths and batch sizes. Refusal is judged on the answer's opening, so short
    answers suffice there; the unchanged-answer check compares longer ones."""

    refusal_tokens: int = 16
    answer_tokens: int = 48
    generation_batch_size: int = 64
    scoring_batch_size: int = 8
    show_progress: bool = True


def _general_teacher_forced(tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt], answers: list[str]):
    contexts = [chat_prompt(tokenizer, prompt.text) for prompt in prompts]
    return TeacherForced.from_texts(tokenizer, contexts, answers)


def _code_teacher_forced(tokenizer: PreTrainedTokenizerBase, sets: EvaluationSets) -> TeacherForced:
    return TeacherForced.from_texts(
        tokenizer, [problem.prompt for problem in sets.code], [problem.solution for problem in sets.code]
    )


def _prose_teacher_forced(tokenizer: PreTrainedTokenizerBase, sets: EvaluationSets) -> TeacherForced:
    """Each passage scored from its second token on (the first is the context)."""
    ids = [tokenizer(passage, add_special_tokens=False)["input_ids"] for passage in sets.prose]
    return TeacherForced([row[:1] for row in ids], [row[1:] for row in ids])


def mean_nll(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: TeacherForced, settings: EvaluationSettings
) -> float:
    """Mean per-token negative log-likelihood of the continuations."""
    total, count = 0.0, 0
    for _, log_probs, targets in scored_log_probs(
        model, tokenizer, data, settings.scoring_batch_size, "NLL", settings.show_progress
    ):
        total -= log_probs.gather(1, targets[:, None]).sum().item()
        count += targets.numel()
    return total / max(count, 1)


@dataclass
class BaseReference:
    """The base model's side of every comparison, computed once."""

    sets: EvaluationSets
    settings: EvaluationSettings
    general_answers: list[str]
    general_log_probs: list[torch.Tensor]  # per scored batch, [positions, vocab], fp32 on CPU
    code_nll: float
    prose_nll: float
    evaluation: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def compute(
        cls,
        base: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        sets: EvaluationSets | None = None,
        settings: EvaluationSettings | None = None,
        judge: RefusalJudge = prefix_judge,
    ) -> BaseReference:
        sets = sets or held_out_sets()
        settings = settings or EvaluationSettings()
        answers = greedy_answers(
            base,
            tokenizer,
            [prompt.text for prompt in sets.general],
            settings.answer_tokens,
            settings.generation_batch_size,
            "base: general answers",
            settings.show_progress,
        )
        teacher_forced = _general_teacher_forced(tokenizer, sets.general, answers)
        log_probs = [
            batch_log_probs
            for _, batch_log_probs, _ in scored_log_probs(
                base, tokenizer, teacher_forced, settings.scoring_batch_size, "base: log-probs", settings.show_progress
            )
        ]
        reference = cls(
            sets=sets,
            settings=settings,
            general_answers=answers,
            general_log_probs=log_probs,
            code_nll=mean_nll(base, tokenizer, _code_teacher_forced(tokenizer, sets), settings),
            prose_nll=mean_nll(base, tokenizer, _prose_teacher_forced(tokenizer, sets), settings),
        )
        reference.evaluation = evaluate_model(base, tokenizer, reference, judge)
        return reference


def _rates(verdicts: Sequence[bool], prompts: Sequence[Prompt]) -> dict[str, float]:
    """The overall rate and the rate per category."""
    by_category: dict[str, list[bool]] = defaultdict(list)
    for verdict, prompt in zip(verdicts, prompts, strict=True):
        by_category[prompt.category].append(verdict)
    rates = {"all": sum(verdicts) / max(len(verdicts), 1)}
    rates.update({category: sum(values) / len(values) for category, values in sorted(by_category.items())})
    return rates


@torch.no_grad()
def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    reference: BaseReference,
    judge: RefusalJudge = prefix_judge,
) -> dict[str, Any]:
    """Every metric of the module docstring for `model`, against `reference`'s base model."""
    started = time.perf_counter()
    sets, settings = reference.sets, reference.settings

    def answers(prompts: list[Prompt], tokens: int, what: str) -> list[str]:
        return greedy_answers(
            model,
            tokenizer,
            [prompt.text for prompt in prompts],
            tokens,
            settings.generation_batch_size,
            what,
            settings.show_progress,
        )

    def refusals(prompts: list[Prompt], replies: list[str]) -> dict[str, float]:
        return _rates(judge([prompt.text for prompt in prompts], replies), prompts)

    harmful = {
        source: refusals(prompts, answers(prompts, settings.refusal_tokens, source))
        for source, prompts in sets.harmful.items()
    }
    all_harmful = [prompt for prompts in sets.harmful.values() for prompt in prompts]
    lookalike_answers = answers(sets.lookalikes, settings.refusal_tokens, "look-alikes")
    general_answers = answers(sets.general, settings.answer_tokens, "general")

    kl_total, kl_count = 0.0, 0
    teacher_forced = _general_teacher_forced(tokenizer, sets.general, reference.general_answers)
    batches = scored_log_probs(
        model, tokenizer, teacher_forced, settings.scoring_batch_size, "KL", settings.show_progress
    )
    for (_, log_probs, _), base_log_probs in zip(batches, reference.general_log_probs, strict=True):
        kl_total += (base_log_probs.exp() * (base_log_probs - log_probs)).sum().item()
        kl_count += log_probs.shape[0]
    code_nll = mean_nll(model, tokenizer, _code_teacher_forced(tokenizer, sets), settings)
    prose_nll = mean_nll(model, tokenizer, _prose_teacher_forced(tokenizer, sets), settings)
    harmful_total = sum(harmful[source]["all"] * len(prompts) for source, prompts in sets.harmful.items())
    return {
        "refusal": {
            **{source: rates["all"] for source, rates in harmful.items()},
            "all": harmful_total / max(len(all_harmful), 1),
        },
        "refusal_by_category": {source: rates for source, rates in harmful.items()},
        "over_refusal": {
            "look-alikes": refusals(sets.lookalikes, lookalike_answers),
            "general": refusals(sets.general, general_answers)["all"],
        },
        "drift": {
            "kl_general": kl_total / max(kl_count, 1),
            "same_answers": sum(
                mine == theirs for mine, theirs in zip(general_answers, reference.general_answers, strict=True)
            )
            / max(len(general_answers), 1),
            "nll_code": code_nll,
            "nll_code_rise": code_nll - reference.code_nll,
            "nll_prose": prose_nll,
            "nll_prose_rise": prose_nll - reference.prose_nll,
        },
        "seconds": time.perf_counter() - started,
    }


def describe(reference: BaseReference, judge: RefusalJudge = prefix_judge) -> dict[str, Any]:
    """What was measured on what, for the report's header."""
    sets = reference.sets
    return {
        "refusal_rule": judge_rule(judge),
        "harmful_prompts": {source: len(prompts) for source, prompts in sets.harmful.items()},
        "lookalike_prompts": len(sets.lookalikes),
        "general_prompts": len(sets.general),
        "code_problems": len(sets.code),
        "prose_passages": len(sets.prose),
        "refusal_tokens": reference.settings.refusal_tokens,
        "answer_tokens": reference.settings.answer_tokens,
        "kl": "mean per-token KL(base || model) over the base model's greedy answers to the held-out general prompts",
    }
