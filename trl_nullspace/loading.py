"""One dataset loader for everything a user names by string: the recipes' `dataset_name` and
`nullspace_reference_dataset` accept the same things (a Hub name, a local data file, a folder of
data files, or a folder written by `save_to_disk`), so a path that works for one works for both."""

from __future__ import annotations

import os

import datasets

DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_dataset_from(name_or_path: str, split: str = "train", config: str | None = None) -> datasets.Dataset:
    """The `split` of a Hub dataset (`config`: its configuration name), of a local data file (which
    holds one split, whatever `split` says), of a folder of data files, or of a `save_to_disk` folder."""
    if os.path.isdir(name_or_path) and os.path.exists(os.path.join(name_or_path, "dataset_info.json")):
        return datasets.load_from_disk(name_or_path)
    if os.path.isdir(name_or_path) and os.path.exists(os.path.join(name_or_path, "dataset_dict.json")):
        splits = datasets.load_from_disk(name_or_path)
        if split not in splits:
            raise ValueError(
                f"The dataset saved at {name_or_path!r} has no split {split!r}; it has {sorted(splits)}. "
                "Name one of them (dataset_train_split, or nullspace_reference_split)."
            )
        return splits[split]
    if os.path.isfile(name_or_path):
        extension = os.path.splitext(name_or_path)[1].lower()
        if extension not in DATA_FILE_BUILDERS:
            raise ValueError(
                f"Dataset file {name_or_path!r} has an unsupported extension; use one of {sorted(DATA_FILE_BUILDERS)}."
            )
        return datasets.load_dataset(DATA_FILE_BUILDERS[extension], data_files=name_or_path, split="train")
    return datasets.load_dataset(name_or_path, name=config, split=split)
