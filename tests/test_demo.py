"""The embedded demo, small: plain SFT loses the general skill, null-space SFT keeps it and refuses."""

import json

from trl_nullspace.demo.__main__ import main


def test_quick_demo_shows_the_alignment_tax_and_its_removal(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["demo", "--quick", "--output-dir", str(tmp_path)])
    main()
    base, plain, null_space = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert "| plain TRL SFTTrainer |" in (tmp_path / "results.md").read_text()
    assert base["general_accuracy"] > 0.5  # the pretraining gave a real skill
    assert plain["general_accuracy"] < base["general_accuracy"] - 0.3  # the alignment tax
    assert null_space["general_accuracy"] >= base["general_accuracy"] - 0.1  # kept
    assert null_space["refusal_harmful"] > 0.25  # while learning to refuse
