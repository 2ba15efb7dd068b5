"""The examples in docs/api.md run: every Python block, in order, in one namespace, offline."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_api_reference_examples_run(tmp_path, monkeypatch, capsys):
    text = open(os.path.join(ROOT, "docs", "api.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 8
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for index, block in enumerate(blocks):
        exec(compile(block, f"docs/api.md block {index}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "does not match this run" in printed  # the CacheMismatchError example raised as documented
    assert "[1.0]" in printed and "[0.0, 1.0]" in printed
