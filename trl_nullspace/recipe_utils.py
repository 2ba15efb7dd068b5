"""What the `recipes/` scripts share: parsing `--config file.yaml`, loading the model and data."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import datasets
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from trl_nullspace.data.loading import load_dataset_from, looks_like_a_path
from trl_nullspace.training.progress import quiet_progress


@contextlib.contextmanager
def wrong_types_named() -> Iterator[None]:
    """Name a setting of the wrong type as the user's mistake. A YAML config's values reach the config
    dataclasses unconverted (command-line flags are converted by argparse), so a list where a number
    belongs fails inside `__post_init__` as a bare TypeError; any other TypeError is left alone."""
    try:
        yield
    except TypeError as error:
        raise ValueError(
            f"A setting has the wrong type ({error}): check the values given with --config (e.g. a list where a "
            "number belongs) against docs/configuration.md."
        ) from error


def parse_recipe_arguments(
    config_class: type, args: list[str] | None = None
) -> tuple[ScriptArguments, object, ModelConfig]:
    """TRL-style parsing: `--config file.yaml` plus command-line flags that override it."""
    with wrong_types_named():
        return TrlParser((ScriptArguments, config_class, ModelConfig)).parse_args_and_config(args=args)


def load_model_and_tokenizer(model_args: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    name = model_args.model_name_or_path
    if name is None:
        raise ValueError("No model: set model_name_or_path (a local folder or a Hub model id).")
    if looks_like_a_path(name) and not os.path.isdir(os.path.expanduser(name)):
        raise FileNotFoundError(
            f"model_name_or_path {name!r} does not exist: no such folder. Give a folder written by save_pretrained "
            "(or `trl-nullspace gguf`), or a Hub model id."
        )
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    return model, tokenizer


def load_train_dataset(script_args: ScriptArguments) -> datasets.Dataset:
    """`dataset_name`: whatever `nullspace_reference_dataset` accepts (`trl_nullspace.data.loading`)."""
    return load_dataset_from(script_args.dataset_name, script_args.dataset_train_split, script_args.dataset_config)


def run_recipe(trainer_class: type, config_class: type, args: list[str] | None = None, **trainer_kwargs) -> None:
    """Parse `--config` (from `args`, default the command line), load model and data, train (resuming
    if asked) and save: every recipe's and CLI training command's body."""
    script_args, training_args, model_args = parse_recipe_arguments(config_class, args)
    if not training_args.disable_tqdm:
        datasets.disable_progress_bars()  # TRL's few-second dataset passes: one bar each, none needed
    model, tokenizer = load_model_and_tokenizer(model_args)
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=load_train_dataset(script_args),
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        **trainer_kwargs,
    )
    if not training_args.disable_tqdm:
        quiet_progress(trainer)  # a bar, not a dictionary per logging step (the logs are kept)
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json: every logged metric, as the console no longer prints them
    if trainer.is_world_process_zero():
        print(
            f"trained {result.global_step} steps in {result.metrics['train_runtime'] / 60:.1f} min "
            f"(mean loss {result.training_loss:.4g}); model saved to {training_args.output_dir}, logs in "
            f"{training_args.output_dir}/trainer_state.json"
        )
    # Finish trackers and tear the process group down explicitly, not in interpreter shutdown.
    trainer.accelerator.end_training()
