"""`trl-nullspace`: estimate writes the cache a trainer then loads as is; inspect reports and checks."""

import glob
import json
import os
import re

import datasets
import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ScriptArguments

from tests.conftest import training_kwargs
from trl_nullspace import NullSpaceSFTConfig, NullSpaceSFTTrainer
from trl_nullspace.cli import main
from trl_nullspace.data import toy
from trl_nullspace.data.loading import load_dataset_from
from trl_nullspace.data.toy_assets import write_toy_assets
from trl_nullspace.recipe_utils import load_train_dataset
from trl_nullspace.storage.cache import load_subspace


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    directory = tmp_path_factory.mktemp("toy")
    write_toy_assets(str(directory))
    return directory


def _estimate(assets, cache) -> None:
    main(
        ["estimate", "--model_name_or_path", str(assets / "model"), "--quiet"]
        + ["--nullspace_reference_dataset", str(assets / "reference" / "train.jsonl")]
        + ["--nullspace_reference_num_samples", "16", "--nullspace_cache_path", str(cache)]
    )


def test_estimate_writes_a_cache_the_trainer_loads_without_re_estimating(assets, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "subspace.safetensors"
    _estimate(assets, cache)
    printed = capsys.readouterr().out
    assert "rank" in printed and "energy kept" in printed and str(cache) in printed

    def must_not_estimate(self):
        raise AssertionError("the trainer re-estimated instead of loading the CLI's cache")

    monkeypatch.setattr(NullSpaceSFTTrainer, "estimate_subspace", must_not_estimate)
    trainer = NullSpaceSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(str(assets / "model")),
        args=NullSpaceSFTConfig(
            **training_kwargs(tmp_path), nullspace_cache_path=str(cache), nullspace_reference_num_samples=16
        ),
        train_dataset=load_dataset_from(str(assets / "reference" / "train.jsonl")),
        processing_class=AutoTokenizer.from_pretrained(str(assets / "model")),
        reference_dataset=load_dataset_from(str(assets / "reference" / "train.jsonl")),
    )
    saved = load_file(str(cache))
    for key, basis in trainer.nullspace_subspace.bases.items():
        assert (saved[f"basis/{key}"] == basis).all()


def test_inspect_reports_the_cache_and_whether_a_model_fits(assets, tmp_path, capsys):
    cache = tmp_path / "subspace.safetensors"
    _estimate(assets, cache)
    capsys.readouterr()
    assert main(["inspect", str(cache), "--model", str(assets / "model")]) == 0
    printed = capsys.readouterr().out
    assert "activation subspace" in printed and "MiB on disk" in printed and "matches" in printed
    assert "energy kept:" in printed and "outside the protected span" in printed
    bases = len(load_subspace(str(cache))[0].bases)
    assert len(printed.splitlines()) <= 20  # a screen whatever the model: not one line per basis
    assert main(["inspect", str(cache), "--per-layer"]) == 0
    assert capsys.readouterr().out.count(": rank ") == bases

    other = tmp_path / "other-model"
    toy.build_tiny_qwen2(toy.build_char_tokenizer(), seed=1).save_pretrained(str(other))
    assert main(["inspect", str(cache), "--model", str(other)]) == 1
    assert "does NOT match" in capsys.readouterr().out


def test_unknown_command_prints_usage(capsys):
    assert main(["train"]) == 2
    assert "usage: trl-nullspace" in capsys.readouterr().out


def test_rloo_command_runs_the_shipped_toy_recipe(assets, tmp_path):
    """The CLI docs' `trl-nullspace rloo --config recipes/configs/toy_rloo.yaml`, on the toy assets."""
    config = os.path.join(os.path.dirname(os.path.dirname(__file__)), "recipes", "configs", "toy_rloo.yaml")
    assert (
        main(
            ["rloo", "--config", config, "--model_name_or_path", str(assets / "model")]
            + ["--dataset_name", str(assets / "safety_prompts"), "--max_steps", "1"]
            + ["--nullspace_reference_dataset", str(assets / "reference" / "train.jsonl")]
            + ["--output_dir", str(tmp_path / "out")]
        )
        == 0
    )
    assert (tmp_path / "out" / "nullspace_config.json").exists()


def test_sft_command_runs_the_recipe(assets, tmp_path):
    main(
        ["sft", "--model_name_or_path", str(assets / "model"), "--dataset_name", str(assets / "safety_sft")]
        + ["--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--use_cpu", "--bf16", "False"]
        + ["--report_to", "none", "--nullspace_reference_dataset", str(assets / "reference" / "train.jsonl")]
        + ["--nullspace_reference_num_samples", "8"]
    )
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_recipes_take_every_local_dataset_the_reference_option_takes(tmp_path):
    """One loader for `dataset_name` and `nullspace_reference_dataset`: a data file, a `save_to_disk`
    folder of one split, and one of several splits (a missing split is named)."""
    texts = ["12+7=19", "3*4=12"]
    dataset = datasets.Dataset.from_dict({"text": texts})
    dataset.to_json(str(tmp_path / "data.jsonl"))
    dataset.save_to_disk(str(tmp_path / "one_split"))
    datasets.DatasetDict(train=dataset, test=dataset.select([0])).save_to_disk(str(tmp_path / "splits"))
    for name in ("data.jsonl", "one_split", "splits"):
        path = str(tmp_path / name)
        assert load_train_dataset(ScriptArguments(dataset_name=path))["text"] == texts
        assert load_dataset_from(path)["text"] == texts
    assert (
        load_train_dataset(ScriptArguments(dataset_name=str(tmp_path / "splits"), dataset_train_split="test"))["text"]
        == texts[:1]
    )
    with pytest.raises(ValueError, match=r"has no split 'validation'; it has \['test', 'train'\]"):
        load_dataset_from(str(tmp_path / "splits"), split="validation")


PKU_STAND_IN = {  # PKU-SafeRLHF's columns; four pairs: one safe/unsafe each way, both safe, both unsafe
    "prompt": ["How do I pick a lock?", "How do I pick a lock?", "Tell me a joke", "How to make a bomb?"],
    "response_0": ["I can't help with that.", "Use a tension wrench...", "Why did the...", "Mix..."],
    "response_1": ["Use a tension wrench...", "Locksmiths can help.", "Knock knock.", "Combine..."],
    "is_response_0_safe": [True, False, True, False],
    "is_response_1_safe": [False, True, True, False],
    "safer_response_id": [0, 1, 0, 1],
}


def test_prepare_turns_pku_saferlhf_into_the_recipes_formats(tmp_path, capsys):
    source = tmp_path / "pku.jsonl"
    datasets.Dataset.from_dict(PKU_STAND_IN).to_json(str(source))
    assert main(["prepare", "pku-saferlhf", "--dataset", str(source), "--output-dir", str(tmp_path / "data")]) == 0
    sft = load_dataset_from(str(tmp_path / "data" / "pku_saferlhf_safe_sft"))
    dpo = load_dataset_from(str(tmp_path / "data" / "pku_saferlhf_dpo"))
    prompts = load_dataset_from(str(tmp_path / "data" / "safety_prompts"))
    # SFT: the safer response where it is safe (pairs 0, 1, 2; pair 3's safer response is unsafe).
    assert sft["completion"] == ["I can't help with that.", "Locksmiths can help.", "Why did the..."]
    # DPO: exactly one safe response (pairs 0 and 1), which is chosen.
    assert dpo.column_names == ["prompt", "chosen", "rejected"]
    assert dpo["chosen"] == ["I can't help with that.", "Locksmiths can help."]
    assert dpo["rejected"] == ["Use a tension wrench...", "Use a tension wrench..."]
    # GRPO/RLOO: distinct prompts, harmful when any response to them was unsafe.
    assert dict(zip(prompts["prompt"], prompts["harmful"], strict=True)) == {
        "How do I pick a lock?": True,
        "Tell me a joke": False,
        "How to make a bomb?": True,
    }
    assert "pku_saferlhf_dpo: 2 rows" in capsys.readouterr().out


def test_prepare_reference_keeps_the_first_conversations_and_names_missing_columns(tmp_path, capsys):
    chats = [
        [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "answer"}] for i in range(5)
    ]
    source = tmp_path / "chat.jsonl"
    datasets.Dataset.from_dict({"messages": chats, "id": list(range(5))}).to_json(str(source))
    main(["prepare", "reference", "--dataset", str(source), "--num-samples", "3", "--output-dir", str(tmp_path)])
    reference = load_dataset_from(str(tmp_path / "reference"))
    assert reference.column_names == ["messages"] and reference["messages"] == chats[:3]
    capsys.readouterr()
    assert main(["prepare", "pku-saferlhf", "--dataset", str(source), "--output-dir", str(tmp_path)]) == 2
    assert re.search(r"no column\(s\) \['prompt', 'response_0'.*Give PKU-SafeRLHF", capsys.readouterr().err)


@pytest.mark.parametrize(
    "path", sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(__file__)), "recipes", "configs", "*.yaml")))
)
def test_every_shipped_recipe_config_parses(path):
    """Every YAML a user is pointed at parses into its trainer's config with the installed TRL and
    transformers (bf16 off: CI has no GPU). The Hub recipes cannot run here; this catches keys a
    library release removed (transformers 5 dropped `warmup_ratio`, which the 0.5B SFT recipe used)."""
    from trl_nullspace import NullSpaceDPOConfig, NullSpaceGRPOConfig, NullSpaceRLOOConfig, NullSpaceSFTConfig
    from trl_nullspace.recipe_utils import parse_recipe_arguments

    config_class = {
        "sft": NullSpaceSFTConfig,
        "dpo": NullSpaceDPOConfig,
        "grpo": NullSpaceGRPOConfig,
        "rloo": NullSpaceRLOOConfig,
    }[os.path.basename(path).rsplit("_", 1)[1].removesuffix(".yaml")]
    _, config, _ = parse_recipe_arguments(config_class, ["--config", path, "--bf16", "false"])
    assert isinstance(config, config_class)


def _sft_flags(assets, tmp_path, **overrides) -> list[str]:
    flags = {
        "model_name_or_path": str(assets / "model"),
        "dataset_name": str(assets / "safety_sft"),
        "nullspace_reference_dataset": str(assets / "reference" / "train.jsonl"),
        "output_dir": str(tmp_path / "out"),
        "max_steps": "1",
        "use_cpu": "true",
        "bf16": "false",
        "report_to": "none",
        **overrides,
    }
    return [part for key, value in flags.items() for part in (f"--{key}", value)]


CLI_MISTAKES = {
    "energy out of range": (lambda assets, tmp: _sft_flags(assets, tmp, nullspace_energy="1.5"), "nullspace_energy"),
    "missing reference file": (
        lambda assets, tmp: _sft_flags(assets, tmp, nullspace_reference_dataset=str(tmp / "nope.jsonl")),
        "nope.jsonl' does not exist",
    ),
    "missing model folder": (
        lambda assets, tmp: _sft_flags(assets, tmp, model_name_or_path=str(tmp / "no-model")),
        "no-model' does not exist",
    ),
    "cache of another model": (
        lambda assets, tmp: _sft_flags(assets, tmp, nullspace_cache_path=str(tmp / "other.safetensors")),
        "does not match this run",
    ),
}


@pytest.mark.parametrize("mistake", sorted(CLI_MISTAKES))
def test_ordinary_mistakes_print_one_message_and_exit_2(assets, tmp_path, capsys, monkeypatch, mistake):
    """TRL's and Accelerate's CLIs print the message, not a Python traceback."""
    monkeypatch.delenv("TRL_NULLSPACE_TRACEBACK", raising=False)
    if mistake == "cache of another model":
        other = tmp_path / "other-model"
        tokenizer = toy.build_char_tokenizer()
        toy.build_tiny_qwen2(tokenizer, seed=1).save_pretrained(str(other))
        tokenizer.save_pretrained(str(other))
        main(
            ["estimate", "--model_name_or_path", str(other), "--quiet"]
            + ["--nullspace_reference_dataset", str(assets / "reference" / "train.jsonl")]
            + [
                "--nullspace_reference_num_samples",
                "16",
                "--nullspace_cache_path",
                str(tmp_path / "other.safetensors"),
            ]
        )
        capsys.readouterr()
    flags, said = CLI_MISTAKES[mistake]
    assert main(["sft", *flags(assets, tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "trl-nullspace sft: error: " in error and said in error, error
    assert "Traceback" not in error


def test_a_yaml_setting_of_the_wrong_type_is_one_message(assets, tmp_path, capsys, monkeypatch):
    """YAML values reach the config unconverted: a list where a number belongs is named, not a traceback."""
    monkeypatch.delenv("TRL_NULLSPACE_TRACEBACK", raising=False)
    config = tmp_path / "wrong.yaml"
    flags = _sft_flags(assets, tmp_path)
    settings = dict(zip(flags[::2], flags[1::2], strict=True))
    lines = [f"{key.removeprefix('--')}: {value}\n" for key, value in settings.items()]
    config.write_text("".join(lines) + "nullspace_energy: [0.9]\n")
    assert main(["sft", "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert "error: A setting has the wrong type" in error and "Traceback" not in error, error


def test_a_missing_gguf_file_is_one_message(tmp_path, capsys):
    assert main(["gguf", str(tmp_path / "model.gguf"), "--output-dir", str(tmp_path / "out")]) == 2
    assert "error: No GGUF file at" in capsys.readouterr().err


def test_the_traceback_is_there_when_asked(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_NULLSPACE_TRACEBACK", "1")
    with pytest.raises(ValueError, match="nullspace_energy"):
        main(["sft", *_sft_flags(assets, tmp_path, nullspace_energy="1.5")])


def _trl_script_with_the_import_swap(name: str) -> dict:
    """TRL's own example script `trl/scripts/{name}.py`, read from the installed package, with only its
    trainer and config imports swapped for the null-space ones (what a user does), as a namespace."""
    import importlib
    import inspect

    source = inspect.getsource(importlib.import_module(f"trl.scripts.{name}"))
    swaps = {
        "from trl import SFTTrainer,": (
            "from trl_nullspace import NullSpaceSFTTrainer as SFTTrainer\n    from trl import"
        ),
        "ScriptArguments, SFTConfig, TrlParser": "ScriptArguments, TrlParser\n"
        "    from trl_nullspace import NullSpaceSFTConfig as SFTConfig",
    }
    for old, new in swaps.items():
        assert source.count(old) == 1, f"TRL's {name}.py changed: {old!r} not found once"
        source = source.replace(old, new)
    namespace = {"__name__": f"swapped_{name}"}
    exec(compile(source, f"trl/scripts/{name}.py (import swapped)", "exec"), namespace)
    return namespace


def test_trl_own_sft_script_trains_on_prepare_output_with_the_import_swap(assets, tmp_path, capsys):
    """`prepare` writes what TRL's scripts read with `load_dataset`, and the script, its imports swapped,
    trains under the constraint on it (before: save_to_disk folders, which load_dataset refuses)."""
    source = tmp_path / "pku.jsonl"
    datasets.Dataset.from_dict(PKU_STAND_IN).to_json(str(source))
    assert main(["prepare", "pku-saferlhf", "--dataset", str(source), "--output-dir", str(tmp_path / "data")]) == 0
    assert (
        main(
            [
                "prepare",
                "reference",
                "--dataset",
                str(assets / "reference" / "train.jsonl"),
                "--output-dir",
                str(tmp_path / "data"),
            ]
        )
        == 2
    )  # the toy reference has text, not messages
    script = _trl_script_with_the_import_swap("sft")
    output = tmp_path / "out"
    arguments = [
        "--model_name_or_path",
        str(assets / "model"),
        "--dataset_name",
        str(tmp_path / "data" / "pku_saferlhf_safe_sft"),
        "--nullspace_reference_dataset",
        str(assets / "reference" / "train.jsonl"),
        "--output_dir",
        str(output),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--use_cpu",
        "true",
        "--bf16",
        "false",
        "--report_to",
        "none",
    ]
    parser = script["make_parser"]()
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(arguments)
    script["main"](script_args, training_args, model_args, dataset_args)
    assert (output / "model.safetensors").exists()
    assert json.loads((output / "nullspace_config.json").read_text())["method"] == "activation"
