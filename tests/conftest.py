"""Tiny offline fixtures: a character tokenizer, a random Qwen2, generated safety/reference data."""

from __future__ import annotations

import os
from types import SimpleNamespace

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the tests may download; fail at once if something tries

import datasets  # noqa: E402
import pytest
import torch

from trl_nullspace.data import toy
from trl_nullspace.estimation.reference import ReferenceBatch, tokenize_reference


@pytest.fixture(scope="session")
def tokenizer():
    return toy.build_char_tokenizer()


@pytest.fixture
def model(tokenizer):
    return toy.build_tiny_qwen2(tokenizer, seed=0)


@pytest.fixture(scope="session")
def safety_dataset():
    return datasets.Dataset.from_dict(toy.as_prompt_completion(toy.safety_split(seed=0)["train"][:16]))


@pytest.fixture(scope="session")
def reference_dataset():
    """Few enough tokens (24) that every layer input spans less than the hidden size (64)."""
    return datasets.Dataset.from_dict(toy.as_text(toy.general_examples(3, seed=1)))


@pytest.fixture(scope="session")
def safety_prompts(tokenizer) -> list[ReferenceBatch]:
    prompts = datasets.Dataset.from_dict({"text": [e.prompt for e in toy.safety_split(seed=0)["harmful_test"]]})
    return tokenize_reference(prompts, tokenizer, batch_size=8, max_length=64)


def training_kwargs(tmp_path, **overrides) -> dict:
    """Shared TrainingArguments for the tests: fp32 on CPU (bf16 autocast would blur exactness)."""
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=12,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        weight_decay=0.1,
        optim="adamw_torch",
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return kwargs


@torch.no_grad()
def logits_on(model, batches: list[ReferenceBatch]) -> torch.Tensor:
    """Logits at every real (non-padding) position of `batches`, in eval mode."""
    was_training = model.training
    model.eval()
    out = torch.cat(
        [
            model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[b.attention_mask.bool()]
            for b in batches
        ]
    )
    model.train(was_training)
    return out


def make_sft_trainer(
    model, tokenizer, safety_dataset, tmp_path, reference_dataset=None, args=None, peft_config=None, **overrides
):
    """A `NullSpaceSFTTrainer` with the shared test arguments, overridden or extended by `overrides`
    (`nullspace_*` fields or training arguments), or with `args` as given (another config, to test its
    refusal or conversion)."""
    from trl_nullspace import NullSpaceSFTConfig, NullSpaceSFTTrainer

    return NullSpaceSFTTrainer(
        model=model,
        args=NullSpaceSFTConfig(**training_kwargs(tmp_path, **overrides)) if args is None else args,
        train_dataset=safety_dataset,
        processing_class=tokenizer,
        reference_dataset=reference_dataset,
        peft_config=peft_config,
    )


def accelerator_launched_with(backend: str, zero_stage: int = 2) -> SimpleNamespace:
    """What `backend_for` reads of an Accelerator that `accelerate launch` set up for `backend`
    ('deepspeed' at `zero_stage`, 'fsdp1', 'fsdp2'), so a refusal is tested without starting that backend."""
    state = SimpleNamespace(
        deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage) if backend == "deepspeed" else None,
        fsdp_plugin=object() if backend.startswith("fsdp") else None,
    )
    return SimpleNamespace(state=state, is_fsdp2=backend == "fsdp2")


def snapshot_constrained(trainer) -> dict[str, torch.Tensor]:
    return {item.name: item.parameter.detach().clone() for item in trainer.nullspace_projector.constrained}


def constrained_change(trainer, snapshot: dict[str, torch.Tensor]) -> float:
    """Summed norm of how far the constrained parameters moved since `snapshot`."""
    return sum(
        (item.parameter.detach() - snapshot[item.name]).norm().item()
        for item in trainer.nullspace_projector.constrained
    )


@pytest.fixture
def projection_calls(monkeypatch) -> list[bool]:
    """Records every `SubspaceProjector.gradient_stats` call (its `apply` flag) during a test."""
    from trl_nullspace.projection.projector import SubspaceProjector

    calls: list[bool] = []
    original = SubspaceProjector.gradient_stats
    monkeypatch.setattr(
        SubspaceProjector, "gradient_stats", lambda self, apply: calls.append(apply) or original(self, apply)
    )
    return calls


def train_and_measure(trainer) -> tuple[float, float]:
    """Train; return (max change of reference logits, summed change of the constrained parameters)."""
    reference = trainer.nullspace.source.reference_batches
    before = logits_on(trainer.model, reference)
    weights = snapshot_constrained(trainer)
    trainer.train()
    drift = (logits_on(trainer.model, reference) - before).abs().max().item()
    return drift, constrained_change(trainer, weights)
