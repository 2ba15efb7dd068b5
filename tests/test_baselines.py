"""The benchmark's user baselines: replay and the KL retain loss do what they claim."""

from __future__ import annotations

import copy

import datasets
import torch
import torch.nn.functional as F
from trl import SFTConfig, SFTTrainer

from benchmarks.baselines import RetainKLSFTTrainer, retain_batches, top_k_kl, with_replay
from tests.conftest import training_kwargs
from trl_nullspace.data import toy

# A one-line chat template for the character tokenizer (it has none): the turns' text, one per line.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}{{ '' }}{% endif %}"
)


def _chat_tokenizer(tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _conversations(examples: list[toy.Example], answer: bool = True) -> datasets.Dataset:
    turns = [
        [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.completion}]
        for example in examples
    ]
    if answer:
        return datasets.Dataset.from_dict({"messages": turns})
    return datasets.Dataset.from_dict(
        {"prompt": [turn[:1] for turn in turns], "completion": [turn[1:] for turn in turns]}
    )


def test_top_k_kl_is_zero_on_the_base_itself_and_the_full_kl_with_every_token():
    torch.manual_seed(0)
    base = F.log_softmax(torch.randn(5, 11), dim=-1)
    model = F.log_softmax(torch.randn(5, 11), dim=-1)
    top, ids = base.topk(11)
    assert top_k_kl(top, base, ids).abs().item() < 1e-6
    full = (base.exp() * (base - model)).sum(-1).mean()
    assert torch.allclose(top_k_kl(top, model, ids), full, atol=1e-5)
    top3, ids3 = base.topk(3)
    assert 0 < top_k_kl(top3, model, ids3).item() <= full.item() + 1e-6  # coarsened: a lower bound


def test_replay_mixes_every_general_example_into_the_training_data():
    safety = _conversations(toy.safety_split(seed=0)["train"][:6], answer=False)
    general = _conversations(toy.general_examples(4, seed=1))
    mixed = with_replay(safety, general)
    assert len(mixed) == 10
    prompts = {example[0]["content"] for example in mixed["prompt"]}
    assert {messages[0]["content"] for messages in general["messages"]} <= prompts


def test_kl_retain_term_holds_general_answers_closer_to_the_base_than_plain_sft(tokenizer, tmp_path):
    """With a strong retain weight the general answers' KL to the base model ends far below plain
    SFT's under the same data and steps; with weight 0 it is plain SFT (same loss, same drift)."""
    tokenizer = _chat_tokenizer(tokenizer)
    safety = _conversations(toy.safety_split(seed=0)["train"][:16], answer=False)
    general = _conversations(toy.general_examples(8, seed=1))
    base = toy.build_tiny_qwen2(tokenizer, seed=0)
    cached = retain_batches(base, tokenizer, general, batch_size=4)

    def kl_after(trainer_class, **extra) -> float:
        model = copy.deepcopy(base)
        args = SFTConfig(**training_kwargs(tmp_path, max_steps=12, learning_rate=3e-3, weight_decay=0.0))
        trainer = trainer_class(model=model, args=args, train_dataset=safety, processing_class=tokenizer, **extra)
        trainer.train()
        model.eval()
        with torch.no_grad():
            kls = []
            for batch in cached:
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                kls.append(top_k_kl(batch.top_log_probs, F.log_softmax(logits[batch.positions], -1), batch.top_ids))
        return torch.stack(kls).mean().item()

    plain = kl_after(SFTTrainer)
    unweighted = kl_after(RetainKLSFTTrainer, retain_dataset=general, retain_weight=0.0)
    retained = kl_after(RetainKLSFTTrainer, retain_dataset=general, retain_weight=20.0)
    assert plain > 1e-2
    assert abs(unweighted - plain) < 1e-6
    assert retained < 0.3 * plain
