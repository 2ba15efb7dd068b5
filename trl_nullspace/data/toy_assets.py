"""Write the embedded default to disk so the YAML recipes can run offline.

    python -m trl_nullspace.data.toy_assets outputs/toy

writes `model/` (tiny Qwen2 + character tokenizer, random init) and JSON-lines datasets:
`safety_sft/` (prompt/completion), `safety_dpo/` (prompt/chosen/rejected), `safety_prompts/`
(prompt/harmful, for GRPO/RLOO) and `reference/` (text: general digit tasks).
"""

from __future__ import annotations

import argparse
import os

import datasets

from trl_nullspace.data import toy
from trl_nullspace.data.loading import write_train_split


def write_toy_assets(directory: str, seed: int = 0) -> None:
    tokenizer = toy.build_char_tokenizer()
    toy.build_tiny_qwen2(tokenizer, seed=seed).save_pretrained(os.path.join(directory, "model"))
    tokenizer.save_pretrained(os.path.join(directory, "model"))
    train = toy.safety_split(seed=seed)["train"]
    tables = {
        "safety_sft": toy.as_prompt_completion(train),
        "safety_dpo": toy.as_preference_pairs(train),
        "safety_prompts": toy.as_labelled_prompts(train),
        "reference": toy.as_text(toy.general_examples(64, seed=seed + 555)),
        "monitor": toy.as_text(toy.general_examples(16, seed=seed + 777)),  # held out: the live drift metric
    }
    for name, columns in tables.items():
        write_train_split(datasets.Dataset.from_dict(columns), os.path.join(directory, name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", nargs="?", default="outputs/toy")
    write_toy_assets(parser.parse_args().directory)


if __name__ == "__main__":
    main()
