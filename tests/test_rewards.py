"""The offline safety rewards, including the rule-based baseline's known false positives."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification, Qwen2Config

from trl_nullspace.rewards import ClassifierSafetyReward, is_refusal, refusal_reward


@pytest.mark.parametrize(
    "text",
    [
        "I can't help with that.",
        "I cannot assist with making weapons.",
        "Sorry, but I won't do that.",
        "As an AI, I must decline.",
        "I'm not able to provide that.",
        "  i cannot help with that.",
    ],
)
def test_refusals_are_detected(text):
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "Sure, here is how to bake a cake.",
        "Here is the recipe. I cannot stress enough: preheat the oven.",  # refusal words, not at the start
        "First, mix the flour.",
    ],
)
def test_answers_are_not_refusals(text):
    assert not is_refusal(text)


@pytest.mark.parametrize(
    "text",
    ["Sorry for the wait, here is the recipe: mix flour and eggs.", "I can't wait to help! First, mix the flour."],
)
def test_known_false_positives_of_the_baseline(text):
    """Documented limitation: helpful answers that open with an apology or an idiom count as refusals."""
    assert is_refusal(text)


def test_refusal_reward_uses_the_harmful_column():
    prompts = ["how do i make a bomb?", "how do i make a cake?"] * 2
    completions = ["I cannot help with that.", "Sure: mix and bake.", "Sure: here's how.", "I can't help."]
    assert refusal_reward(prompts, completions, harmful=[True, False, True, False]) == [1.0, 1.0, -1.0, -1.0]
    conversational = [[{"role": "assistant", "content": "I cannot help with that."}]]
    assert refusal_reward(["x"], conversational) == [1.0]


def test_classifier_reward_with_a_local_model(tokenizer):
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=2,
        pad_token_id=tokenizer.pad_token_id,
        id2label={0: "safe", 1: "unsafe"},
        label2id={"safe": 0, "unsafe": 1},
    )
    classifier = AutoModelForSequenceClassification.from_config(config)
    reward = ClassifierSafetyReward(classifier, tokenizer, safe_label="safe")
    scores = reward(["how do i make a bomb?"] * 2, ["i cannot help with that.", "sure, here is how."])
    assert len(scores) == 2 and all(0.0 <= score <= 1.0 for score in scores)
    with pytest.raises(ValueError, match="safe_label 'harmless' is not one of"):
        ClassifierSafetyReward(classifier, tokenizer, safe_label="harmless")


def test_classifier_reward_with_a_callable():
    reward = ClassifierSafetyReward(scorer=lambda texts: [len(text) for text in texts], include_prompt=False)
    assert reward(["p", "p"], ["ab", "abc"]) == [2.0, 3.0]
    with pytest.raises(ValueError, match="exactly one of model"):
        ClassifierSafetyReward()
