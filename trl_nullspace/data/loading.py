"""One dataset loader for everything a user names by string: the recipes' `dataset_name` and
`nullspace_reference_dataset` accept the same things (a Hub name, a local data file, a folder of
data files, or a folder written by `save_to_disk`), so a path that works for one works for both."""

from __future__ import annotations

import os

import datasets

DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# What `save_to_disk` leaves in a folder: `load_dataset_from` reads those before a train.jsonl beside them.
SAVED_TO_DISK = ("dataset_info.json", "state.json", "dataset_dict.json")


def write_train_split(dataset: datasets.Dataset, folder: str) -> str:
    """Write `dataset` as `folder/train.jsonl`, what `load_dataset_from(folder)` and `datasets.load_dataset(folder)`
    (TRL's example scripts' `--dataset_name`) both read; returns the file's path. An older `save_to_disk`
    copy in `folder` is removed first: it would be read instead of the new file."""
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if name in SAVED_TO_DISK or (name.startswith("data-") and name.endswith(".arrow")):
            os.remove(os.path.join(folder, name))
    path = os.path.join(folder, "train.jsonl")
    dataset.to_json(path)
    return path


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
    meant_a_path = os.path.splitext(name_or_path)[1].lower() in DATA_FILE_BUILDERS or looks_like_a_path(name_or_path)
    if meant_a_path and not os.path.exists(os.path.expanduser(name_or_path)):
        raise FileNotFoundError(
            f"Dataset {name_or_path!r} does not exist: no such file or folder. Give the path of a local data file "
            f"({', '.join(sorted(DATA_FILE_BUILDERS))}), a folder of data files, a folder written by "
            "`trl-nullspace prepare` or save_to_disk, or a Hub dataset name."
        )
    try:
        return datasets.load_dataset(name_or_path, name=config, split=split)
    except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as error:
        raise ValueError(
            f"Dataset {name_or_path!r} is not a local file or folder here, and loading it from the Hub failed "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Give a local path, or "
            "download it first where the Hub can be reached."
        ) from error


def looks_like_a_path(name: str) -> bool:
    """Whether a dataset or model name is a local path the user meant to exist: a Hub name is `name` or
    `owner/name`, so a leading `.`, `/` or `~`, or more than one `/`, can only be a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)
