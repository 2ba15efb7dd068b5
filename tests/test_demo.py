"""The embedded demo, small: plain trainers lose the general skill, null-space trainers keep it."""

import json
from pathlib import Path

import pytest

from trl_nullspace.demo.__main__ import cpu_model, main

# `python -m trl_nullspace.demo --quick --seeds 0 1 2`: each metric's mean and range over three seeds.
COMMITTED_QUICK = Path(__file__).parents[1] / "docs" / "results" / "demo_quick_cpu.json"
METRICS = ("refusal_harmful", "over_refusal_benign", "general_accuracy")


def _run(tmp_path, monkeypatch, trainer: str) -> list[dict]:
    monkeypatch.setattr("sys.argv", ["demo", "--quick", "--trainer", trainer, "--output-dir", str(tmp_path)])
    main()
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    return json.loads((tmp_path / "results.json").read_text())


@pytest.fixture(scope="module")
def quick_sft(tmp_path_factory) -> tuple[list[dict], Path]:
    """The quick SFT demo, seed 0, run once for the tests below; its rows and folder."""
    folder = tmp_path_factory.mktemp("demo-sft")
    with pytest.MonkeyPatch.context() as patch:
        return _run(folder, patch, "sft"), folder


def test_quick_sft_demo_shows_the_alignment_tax_and_its_removal(quick_sft):
    (base, plain, null_space), folder = quick_sft
    assert "| plain TRL SFT |" in (folder / "results.md").read_text()
    assert base["general_accuracy"] > 0.5  # the pretraining gave a real skill
    assert plain["general_accuracy"] < base["general_accuracy"] - 0.3  # the alignment tax
    assert null_space["general_accuracy"] >= base["general_accuracy"] - 0.1  # kept
    assert null_space["refusal_harmful"] > 0.25  # while learning to refuse


def test_a_fresh_quick_demo_lies_in_the_committed_ranges_on_their_kind_of_cpu(quick_sft):
    committed = json.loads(COMMITTED_QUICK.read_text())
    if committed[0]["cpu"] != cpu_model():  # other floating-point kernels: whole prompts differ (`cpu_model`)
        pytest.skip(f"the committed quick demo ran on {committed[0]['cpu']!r}, this machine is {cpu_model()!r}")
    ranges = {row["model"]: row["range"] for row in committed}
    for row in quick_sft[0]:
        for metric in METRICS:
            low, high = ranges[row["model"]][metric]
            assert low <= row[metric] <= high, (row["model"], metric, row[metric], (low, high))


@pytest.mark.parametrize("trainer", ["dpo", "grpo"])
def test_quick_two_stage_demos_keep_the_general_skill_in_every_stage(tmp_path, monkeypatch, trainer):
    base, *rows = _run(tmp_path, monkeypatch, trainer)
    stage_two = trainer.upper()
    assert [row["model"] for row in rows] == [
        "plain TRL SFT",
        f"plain TRL SFT→{stage_two}",
        "null-space SFT",
        f"null-space SFT→{stage_two}",
    ]
    for row in rows:
        if row["model"].startswith("null-space"):
            assert row["general_accuracy"] >= base["general_accuracy"] - 0.1
        else:
            assert row["general_accuracy"] < base["general_accuracy"] - 0.3
