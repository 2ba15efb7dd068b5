"""`trl-nullspace`: the null-space trainers and the subspace cache from the command line.

Training subcommands mirror TRL's CLI and the `recipes/` scripts (a YAML of TRL keys plus
`nullspace_*`, flags override it); run them under `accelerate launch` for several processes:

    trl-nullspace sft  --config recipes/configs/toy_sft.yaml
    trl-nullspace dpo  --config recipes/configs/toy_dpo.yaml
    trl-nullspace grpo --config recipes/configs/toy_grpo.yaml      # offline refusal reward
    trl-nullspace rloo --config recipes/configs/toy_rloo.yaml      # same reward

Evaluation and models (see docs/evaluation.md):

    trl-nullspace evaluate --model TRAINED --base BASE [--output-dir DIR] [--quick]
    trl-nullspace gguf [FILE.gguf --output-dir DIR]    # a GGUF file as a trainable model folder
                                                       # (no FILE: the packaged SmolLM2-135M-Instruct)

Data (see docs/recipes.md):

    trl-nullspace prepare pku-saferlhf --output-dir data   # SFT, DPO and GRPO/RLOO safety sets
    trl-nullspace prepare reference --output-dir data      # general chat reference data

Cache subcommands:

    trl-nullspace estimate --model_name_or_path MODEL --nullspace_reference_dataset DATA \\
        --nullspace_cache_path subspace.safetensors [--nullspace_energy 0.99 ...]
    trl-nullspace inspect subspace.safetensors [--model MODEL] [--per-layer]

`estimate` writes the cache a trainer with the same `nullspace_*` settings and reference data
loads instead of estimating; `inspect` summarises a cache and, given a model, says whether it fits.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

from transformers import AutoModelForCausalLM, HfArgumentParser
from trl import ModelConfig

from trl_nullspace.config import (
    NullSpaceArguments,
    NullSpaceDPOConfig,
    NullSpaceGRPOConfig,
    NullSpaceRLOOConfig,
    NullSpaceSFTConfig,
)
from trl_nullspace.data.loading import load_dataset_from
from trl_nullspace.estimation.estimate import estimate_subspace
from trl_nullspace.estimation.reference import tokenize_reference
from trl_nullspace.recipe_utils import load_model_and_tokenizer, run_recipe
from trl_nullspace.rewards import refusal_reward
from trl_nullspace.storage.cache import (
    CacheMismatchError,
    check_cache_matches,
    expected_provenance,
    load_subspace,
    resolve_cache_path,
    save_subspace,
    saved_provenance,
)
from trl_nullspace.storage.fingerprint import architecture_fingerprint, weights_fingerprint
from trl_nullspace.trainers import (
    NullSpaceDPOTrainer,
    NullSpaceGRPOTrainer,
    NullSpaceRLOOTrainer,
    NullSpaceSFTTrainer,
)

TRAINERS = {
    "sft": (NullSpaceSFTTrainer, NullSpaceSFTConfig, {}),
    "dpo": (NullSpaceDPOTrainer, NullSpaceDPOConfig, {}),
    "grpo": (NullSpaceGRPOTrainer, NullSpaceGRPOConfig, {"reward_funcs": refusal_reward}),
    "rloo": (NullSpaceRLOOTrainer, NullSpaceRLOOConfig, {"reward_funcs": refusal_reward}),
}


@dataclass
class EstimateArguments:
    """What `estimate` needs besides the `nullspace_*` settings and the model."""

    quiet: bool = field(default=False, metadata={"help": "No progress bar."})


def estimate(argv: list[str]) -> None:
    """Estimate a subspace and write it where `nullspace_cache_path` says."""
    parser = HfArgumentParser((NullSpaceArguments, ModelConfig, EstimateArguments))
    settings, model_args, options = parser.parse_args_into_dataclasses(args=argv)
    if settings.nullspace_cache_path is None or settings.nullspace_reference_dataset is None:
        parser.error("estimate needs --nullspace_cache_path and --nullspace_reference_dataset.")
    if model_args.model_name_or_path is None:
        parser.error("estimate needs --model_name_or_path.")
    model, tokenizer = load_model_and_tokenizer(model_args)
    batches = tokenize_reference(
        load_dataset_from(settings.nullspace_reference_dataset, settings.nullspace_reference_split),
        tokenizer,
        batch_size=settings.nullspace_reference_batch_size,
        max_length=settings.nullspace_reference_max_length,
        num_samples=settings.nullspace_reference_num_samples,
    )
    subspace = estimate_subspace(model, batches, settings, show_progress=not options.quiet)
    weights = weights_fingerprint(model)
    expected = expected_provenance(model, settings, batches, weights)
    path = resolve_cache_path(settings.nullspace_cache_path, model, expected)
    save_subspace(path, subspace, saved_provenance(model, weights, expected))
    print(subspace.overview())
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.2f} MiB)")


def inspect_cache(argv: list[str]) -> int:
    """Summarise a cache; with `--model`, check it against that model (exit code 1 if it does not fit)."""
    parser = argparse.ArgumentParser(prog="trl-nullspace inspect", description=inspect_cache.__doc__)
    parser.add_argument("cache", help="a .safetensors file written by estimate or by a trainer")
    parser.add_argument("--model", help="a model folder or Hub name to check the cache against")
    parser.add_argument("--per-layer", action="store_true", help="one line per basis (rank, energy, layers)")
    options = parser.parse_args(argv)
    subspace, header = load_subspace(options.cache)
    print(subspace.summary() if options.per_layer else subspace.overview())
    print(f"file: {options.cache}, {os.path.getsize(options.cache) / 2**20:.2f} MiB on disk")
    for key in ("model_name", "library_version", "rank_selection", "target_modules", "settings"):
        if key in header:
            print(f"{key}: {header[key]}")
    for key in ("architecture_fingerprint", "weights_fingerprint", "reference_fingerprint"):
        if key in header:
            print(f"{key}: {header[key][:16]}…")
    if header.get("anchors"):
        print(f"anchors: {len(header['anchors'])} (a trainer checkpoint)")
    if options.model is None:
        return 0
    model = AutoModelForCausalLM.from_pretrained(options.model)
    expected = {
        "architecture_fingerprint": architecture_fingerprint(model),
        "weights_fingerprint": weights_fingerprint(model),
    }
    try:
        check_cache_matches(options.cache, header, expected)
    except CacheMismatchError as mismatch:
        print(f"does NOT match {options.model}:\n{mismatch}")
        return 1
    print(f"matches {options.model} (architecture and weights)")
    return 0


# Errors that describe the user's input (a path, a setting, a cache that does not fit): their message
# names the cause and the fix, so the CLI prints it alone, as TRL's and Accelerate's CLIs do.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, CacheMismatchError)
TRACEBACK_VARIABLE = "TRL_NULLSPACE_TRACEBACK"


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. An error in the user's input prints `trl-nullspace CMD: error: MESSAGE` on
    stderr and returns 2 (set TRL_NULLSPACE_TRACEBACK=1 for the traceback)."""
    argv = sys.argv[1:] if argv is None else argv
    commands = [*TRAINERS, "estimate", "inspect", "evaluate", "gguf", "prepare"]
    if not argv or argv[0] not in commands:
        print(__doc__)
        print(f"usage: trl-nullspace {{{','.join(commands)}}} ...")
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    try:
        return _run(argv[0], argv[1:])
    except USER_ERRORS as error:
        if os.environ.get(TRACEBACK_VARIABLE):
            raise
        print(f"trl-nullspace {argv[0]}: error: {error}", file=sys.stderr)
        return 2


def _run(command: str, rest: list[str]) -> int:
    if command == "estimate":
        estimate(rest)
        return 0
    if command == "inspect":
        return inspect_cache(rest)
    if command == "evaluate":
        from trl_nullspace.evaluation.report import main as evaluate_main

        return evaluate_main(rest)
    if command == "prepare":
        from trl_nullspace.data.prepare import main as prepare_main

        prepare_main(rest)
        return 0
    if command == "gguf":
        from trl_nullspace.data.gguf import main as gguf_main

        gguf_main(rest)
        return 0
    trainer_class, config_class, trainer_kwargs = TRAINERS[command]
    run_recipe(trainer_class, config_class, args=rest, **trainer_kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
