"""The documentation's Python examples run as written: each block is executed by a test here, or is
marked `<!-- fragment: why -->` (it uses names the reader supplies) and then at least compiles and
imports only what the package has."""

import ast
import glob
import importlib
import os
import re

import datasets
import pytest

from trl_nullspace.data import toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = re.compile(r"(<!-- fragment[^>]*-->\n)?```python\n(.*?)```", flags=re.S)
# Blocks executed below, by file: every other Python block in README.md and docs/*.md must be a fragment.
RUN = {"docs/api.md": "all", "README.md": [0], "docs/getting-started.md": [0]}


def _blocks(relative: str) -> list[tuple[bool, str]]:
    """(marked a fragment, code) of every Python block in a Markdown file."""
    text = open(os.path.join(ROOT, relative)).read()
    return [(bool(marker), code) for marker, code in BLOCK.findall(text)]


def _documents() -> list[str]:
    return [
        "README.md",
        *sorted(os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "docs", "*.md"))),
    ]


@pytest.mark.parametrize("relative", _documents())
def test_every_python_block_is_run_or_marked_a_fragment(relative):
    run = RUN.get(relative, [])
    for index, (fragment, code) in enumerate(_blocks(relative)):
        executed = run == "all" or index in run
        assert executed != fragment, f"{relative} block {index}: run it in tests/test_docs.py or mark it a fragment"
        tree = ast.parse(code)  # a fragment still parses, and imports only what exists
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trl_nullspace"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{relative} block {index}: {node.module}.{alias.name}"


def test_api_reference_examples_run(tmp_path, monkeypatch, capsys):
    blocks = [code for _, code in _blocks("docs/api.md")]
    assert len(blocks) >= 8
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for index, block in enumerate(blocks):
        exec(compile(block, f"docs/api.md block {index}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "does not match this run" in printed  # the CacheMismatchError example raised as documented
    assert "[1.0]" in printed and "[0.0, 1.0]" in printed


@pytest.mark.parametrize(("relative", "index"), [("README.md", 0), ("docs/getting-started.md", 0)])
def test_the_swap_examples_train_as_written(relative, index, tmp_path, monkeypatch):
    """The README's and getting-started's trainer examples, as written (no bf16 or CPU flags: on a
    machine without a bf16 GPU the configs train in fp32), with the offline tiny model and toy data
    under the names the text gives them."""
    tokenizer = toy.build_char_tokenizer()
    safety = datasets.Dataset.from_dict(toy.as_prompt_completion(toy.safety_split(seed=0)["train"][:16]))
    general = datasets.Dataset.from_dict(toy.as_text(toy.general_examples(8, seed=1)))
    namespace = {
        "model": toy.build_tiny_qwen2(tokenizer, seed=0),
        "tokenizer": tokenizer,
        "safety_dataset": safety,
        "refusal_data": safety,
        "general_dataset": general,
        "general_data": general,
    }
    monkeypatch.chdir(tmp_path)
    code = _blocks(relative)[index][1]
    exec(compile(code, f"{relative} block {index}", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step > 0 and trainer.nullspace_projector.constrained
    assert any(path.suffix == ".safetensors" for path in tmp_path.iterdir())  # the cache the example names


PACKAGE = os.path.join(ROOT, "trl_nullspace")
CORE = ("config", "estimation", "projection", "backends", "storage")  # docs/architecture.md: imports only itself


def _package_parts() -> list[str]:
    """Every folder and top-level module of the package, as the architecture map names them."""
    parts = []
    for name in sorted(os.listdir(PACKAGE)):
        path = os.path.join(PACKAGE, name)
        if os.path.isdir(path) and os.path.exists(os.path.join(path, "__init__.py")):
            parts.append(f"`{name}/`")
        elif name.endswith(".py") and name != "__init__.py":
            parts.append(f"`{name}`")
    return parts


def test_the_architecture_map_names_every_folder_and_top_level_module():
    table = open(os.path.join(ROOT, "docs", "architecture.md")).read().split("## The path")[0]
    rows = {line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| `")}
    assert set(_package_parts()) <= rows, f"missing from docs/architecture.md: {set(_package_parts()) - rows}"


def _imported_parts(path: str) -> set[str]:
    """The package folders or top-level modules a file imports."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        found |= {name.split(".")[1] for name in names if name.startswith("trl_nullspace.")}
    return found


@pytest.mark.parametrize("part", CORE)
def test_the_core_imports_only_the_core(part):
    """Estimation, projection, backends and storage never reach up into training or the tooling."""
    path = os.path.join(PACKAGE, part)
    files = glob.glob(os.path.join(path, "**", "*.py"), recursive=True) if os.path.isdir(path) else [f"{path}.py"]
    for file in files:
        outside = _imported_parts(file) - set(CORE) - {"_version"}
        assert not outside, f"{os.path.relpath(file, ROOT)} imports {sorted(outside)}: the core imports only itself"


def test_the_mixin_is_thin_and_the_constraint_holds_the_state():
    """The mixin overrides only the Trainer hooks where the constraint acts and adds only the public views
    of it; the constraint's state lives in `CapabilityConstraint`, which never reads the Trainer."""
    from transformers import Trainer

    from trl_nullspace.training import constraint
    from trl_nullspace.training.mixin import NullSpaceTrainerMixin

    own = {name for name in vars(NullSpaceTrainerMixin) if not name.startswith("__")}
    hooks = {name for name in own if hasattr(Trainer, name)}
    assert hooks == {
        "training_step",
        "log",
        "save_model",
        "create_model_card",
        "_save_checkpoint",
        "train",
        "_load_from_checkpoint",
    }
    views = {"nullspace_subspace", "nullspace_projector", "nullspace_backend", "nullspace_settings"}
    views |= {"nullspace_start_summary", "estimate_subspace", "refresh_subspace"}
    helpers = {"_add_drift_monitor", "_step_will_be_logged"}
    assert own - hooks == views | helpers, own - hooks - views - helpers
    source = open(constraint.__file__).read()
    assert "Trainer" not in _imported_names(constraint.__file__) and "self.trainer" not in source


def _imported_names(path: str) -> set[str]:
    return {
        alias.name
        for node in ast.walk(ast.parse(open(path).read()))
        if isinstance(node, ast.ImportFrom | ast.Import)
        for alias in node.names
    }
