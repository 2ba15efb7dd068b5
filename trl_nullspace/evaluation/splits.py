"""Fixed, disjoint splits of the evaluation data: what may be trained or tuned on, and what is held out.

Every item is assigned by a hash of its text, so a split never depends on order, seed or which
other items exist, and an item stays in its split when the data grows. Held-out items are never
used for training, reference data or tuning; tuning (learning rates, levers) is judged on the
development sets, which are on the training side but never trained on:

| data | training | development (tuning) | held out (evaluation only) |
|---|---|---|---|
| Do-Not-Answer | 50% | 10% | 40% |
| HarmBench | none | none | all 200 |
| look-alikes (this project) | 20% | 13% | 67% |
| general prompts (this project) | reference 45% | 10% | 45% |
| HumanEval | reference 30% | 20% | 50% |
| book passages | reference 50% | 10% | 10% (the rest unused) |
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from trl_nullspace.evaluation import sources
from trl_nullspace.evaluation.sources import CodeProblem, Prompt

Item = TypeVar("Item")


def stable_fraction(text: str) -> float:
    """A number in [0, 1) fixed by `text` alone."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:12], 16) / 16**12


def in_range(items: Sequence[Item], low: float, high: float, key: Callable[[Item], str]) -> list[Item]:
    """The items whose stable fraction lies in [low, high), once each, in their original order."""
    seen: set[str] = set()
    chosen = []
    for item in items:
        text = key(item)
        if text not in seen and low <= stable_fraction(text) < high:
            seen.add(text)
            chosen.append(item)
    return chosen


def _prompt_text(prompt: Prompt) -> str:
    return prompt.text


def _problem_text(problem: CodeProblem) -> str:
    return problem.task_id


def _passage_text(passage: str) -> str:
    return passage


@dataclass
class EvaluationSets:
    """Prompts and texts an evaluation measures on: the held-out sets (`held_out_sets`) or the
    development sets used for tuning (`development_sets`)."""

    harmful: dict[str, list[Prompt]]
    lookalikes: list[Prompt]
    general: list[Prompt]
    code: list[CodeProblem]
    prose: list[str]

    def subsample(self, size: int) -> EvaluationSets:
        """At most `size` items of every set (evenly spaced, so categories stay mixed): `--quick`."""

        def every(items: list) -> list:
            step = max(1, len(items) // size)
            return items[::step][:size]

        return EvaluationSets(
            harmful={source: every(prompts) for source, prompts in self.harmful.items()},
            lookalikes=every(self.lookalikes),
            general=every(self.general),
            code=every(self.code),
            prose=every(self.prose),
        )


@dataclass
class TrainingSide:
    """What training and reference data may use."""

    harmful_train: list[Prompt]
    lookalike_train: list[Prompt]
    general_reference: list[Prompt]
    code_reference: list[CodeProblem]
    prose_reference: list[str]


def held_out_sets() -> EvaluationSets:
    """The evaluation sets of the benchmark's tables: never trained, referenced or tuned on."""
    return EvaluationSets(
        harmful={
            "do-not-answer": in_range(sources.do_not_answer(), 0.6, 1.0, _prompt_text),
            "harmbench": in_range(sources.harmbench(), 0.0, 1.0, _prompt_text),
        },
        lookalikes=in_range(sources.lookalikes(), 1 / 3, 1.0, _prompt_text),
        general=in_range(sources.general_prompts(), 0.55, 1.0, _prompt_text),
        code=in_range(sources.human_eval(), 0.5, 1.0, _problem_text),
        prose=in_range(sources.book_passages(), 0.9, 1.0, _passage_text),
    )


def development_sets() -> EvaluationSets:
    """The sets learning rates and levers are tuned on: training side, never trained on."""
    return EvaluationSets(
        harmful={"do-not-answer": in_range(sources.do_not_answer(), 0.5, 0.6, _prompt_text)},
        lookalikes=in_range(sources.lookalikes(), 0.2, 1 / 3, _prompt_text),
        general=in_range(sources.general_prompts(), 0.45, 0.55, _prompt_text),
        code=in_range(sources.human_eval(), 0.3, 0.5, _problem_text),
        prose=in_range(sources.book_passages(), 0.5, 0.6, _passage_text),
    )


def training_side() -> TrainingSide:
    return TrainingSide(
        harmful_train=in_range(sources.do_not_answer(), 0.0, 0.5, _prompt_text),
        lookalike_train=in_range(sources.lookalikes(), 0.0, 0.2, _prompt_text),
        general_reference=in_range(sources.general_prompts(), 0.0, 0.45, _prompt_text),
        code_reference=in_range(sources.human_eval(), 0.0, 0.3, _problem_text),
        prose_reference=in_range(sources.book_passages(), 0.0, 0.5, _passage_text),
    )
