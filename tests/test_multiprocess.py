"""Real multi-process runs: `accelerate launch` with 2 CPU processes (DDP over gloo) vs 1 process.

Both run the same recipe (`recipes/sft.py`) and YAML; the DDP run splits each batch of 8 over two
processes of 4. Reference outputs must stay the base model's under DDP, and DDP must not drift from
the single-process run more than plain TRL's `SFTTrainer` does under the same two launches (TRL
itself differs by ~0.06 here after 6 steps at lr 1e-2; that gap is not the projection's).
"""

import os
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import logits_on
from trl_nullspace.reference import load_reference_dataset, tokenize_reference
from trl_nullspace.toy_assets import write_toy_assets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCELERATE_DDP = os.path.join(ROOT, "recipes", "accelerate", "cpu_ddp_2proc.yaml")
PLAIN_SFT_RECIPE = """
from trl import SFTConfig, SFTTrainer

from trl_nullspace.recipe_utils import run_recipe

run_recipe(SFTTrainer, SFTConfig)
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    directory = tmp_path_factory.mktemp("toy")
    write_toy_assets(str(directory))
    return directory


def _config(assets, tmp_path, name: str, batch_size: int, null_space: bool) -> str:
    config = {
        "model_name_or_path": str(assets / "model"),
        "dataset_name": str(assets / "safety_sft"),
        "output_dir": str(tmp_path / name),
        "max_steps": 6,
        "per_device_train_batch_size": batch_size,
        "train_sampling_strategy": "sequential",
        "learning_rate": 1.0e-2,
        "weight_decay": 0.1,
        "save_strategy": "no",
        "report_to": "none",
        "bf16": False,
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
    }
    if null_space:
        config |= {
            "nullspace_eigenvalue_threshold": 1.0e-10,
            "nullspace_reference_dataset": str(assets / "reference" / "train.jsonl"),
            "nullspace_reference_num_samples": 3,
            "nullspace_cache_path": str(tmp_path / name / "subspace.safetensors"),
        }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _train(recipe: str, config: str, processes: int) -> None:
    launcher = [sys.executable] if processes == 1 else [sys.executable, "-m", "accelerate.commands.launch"]
    if processes > 1:
        launcher += ["--config_file", ACCELERATE_DDP]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    completed = subprocess.run(
        launcher + [recipe, "--config", config], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]


def _max_difference(first: dict, second: dict) -> float:
    return max((first[name] - second[name]).abs().max().item() for name in first)


def test_ddp_preserves_reference_outputs_and_adds_no_drift(assets, tmp_path):
    null_space_recipe = os.path.join(ROOT, "recipes", "sft.py")
    plain_recipe = tmp_path / "plain_sft.py"
    plain_recipe.write_text(PLAIN_SFT_RECIPE)
    runs = {}
    for name, recipe, null_space in (("nullspace", null_space_recipe, True), ("plain", str(plain_recipe), False)):
        for processes, batch_size in ((1, 8), (2, 4)):
            run = f"{name}-{processes}proc"
            _train(recipe, _config(assets, tmp_path, run, batch_size, null_space), processes)
            runs[run] = load_file(str(tmp_path / run / "model.safetensors"))

    base = AutoModelForCausalLM.from_pretrained(str(assets / "model"))
    base_weights = {name: parameter.detach() for name, parameter in base.named_parameters()}
    assert _max_difference(runs["nullspace-2proc"], base_weights) > 1e-2  # training did something
    plain_gap = _max_difference(runs["plain-1proc"], runs["plain-2proc"])
    null_space_gap = _max_difference(runs["nullspace-1proc"], runs["nullspace-2proc"])
    assert null_space_gap <= 1.5 * plain_gap + 1e-5, (null_space_gap, plain_gap)

    tokenizer = AutoTokenizer.from_pretrained(str(assets / "model"))
    reference = load_reference_dataset(str(assets / "reference" / "train.jsonl")).select(range(3))
    batches = tokenize_reference(reference, tokenizer, batch_size=8, max_length=512)
    trained = AutoModelForCausalLM.from_pretrained(str(tmp_path / "nullspace-2proc"))
    assert (logits_on(trained, batches) - logits_on(base, batches)).abs().max().item() < 1e-4
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain-2proc"))
    assert (logits_on(plain, batches) - logits_on(base, batches)).abs().max().item() > 1e-2


def test_shipped_toy_recipes_run_offline(tmp_path):
    """`recipes/configs/toy_*.yaml` exactly as shipped: SFT, then DPO on its output and cache, and GRPO."""
    write_toy_assets(str(tmp_path / "outputs" / "toy"))
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    for recipe in ("sft", "dpo", "grpo"):
        completed = subprocess.run(
            [sys.executable, os.path.join(ROOT, "recipes", f"{recipe}.py")]
            + ["--config", os.path.join(ROOT, "recipes", "configs", f"toy_{recipe}.yaml")],
            cwd=tmp_path,
            env=environment,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        assert (tmp_path / "outputs" / "recipes" / f"toy_{recipe}" / "model.safetensors").exists()
    assert (tmp_path / "outputs" / "recipes" / "toy_subspace.safetensors").exists()
