"""`trl-nullspace prepare`: public datasets in the formats the recipes' trainers take.

    trl-nullspace prepare pku-saferlhf --output-dir data     # SFT, DPO and GRPO/RLOO sets
    trl-nullspace prepare reference --output-dir data        # general chat data for the subspace

PKU-SafeRLHF pairs two responses to each prompt, each labelled safe or not (`is_response_0_safe`,
`is_response_1_safe`), and names the safer one (`safer_response_id`). From it:
- `pku_saferlhf_safe_sft` (prompt/completion): the safer response, where it is labelled safe;
- `pku_saferlhf_dpo` (prompt/chosen/rejected): pairs with exactly one safe response, chosen safe;
  pairs where both or neither are safe teach no safety preference and are skipped;
- `safety_prompts` (prompt/harmful): each distinct prompt once; `harmful` when some response to it
  was labelled unsafe (the prompt can elicit harm), else benign. The refusal reward uses it.

`reference` takes the first N examples of a chat dataset with a `messages` column (default
UltraChat's `train_sft`), the general-capability data whose layer inputs the subspace protects.
Each set is written with `save_to_disk`, which `dataset_name` and `nullspace_reference_dataset`
both load (`trl_nullspace.loading`).
"""

from __future__ import annotations

import argparse
import os

import datasets

from trl_nullspace.loading import load_dataset_from

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


def _save(dataset: datasets.Dataset, folder: str) -> None:
    dataset.save_to_disk(folder)
    print(f"  {folder}: {len(dataset)} rows, columns {dataset.column_names}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="trl-nullspace prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", choices=("pku-saferlhf", "reference"))
    parser.add_argument("--dataset", help=f"Hub name or local path (default: {PKU_SAFERLHF} / {REFERENCE_CHAT})")
    parser.add_argument("--split", help="default: train (pku-saferlhf), train_sft (reference)")
    parser.add_argument("--num-samples", type=int, default=1024, help="reference: how many conversations")
    parser.add_argument("--output-dir", default="data")
    options = parser.parse_args(argv)
    os.makedirs(options.output_dir, exist_ok=True)
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
