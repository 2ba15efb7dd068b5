"""`trl-nullspace evaluate`: one trained model against its base, as JSON, a short Markdown table and a plot.

    trl-nullspace evaluate --model outputs/my-safety-model --base outputs/models/smollm2-135m-instruct \\
        [--output-dir DIR] [--quick | --max-items N] [--development] \\
        [--refusal-classifier FOLDER --refusal-label LABEL]

`--quick` evaluates at most 32 items per set (`--max-items N`: at most N), a smoke test, not a
result; `--development` evaluates on the development sets that tuning may use instead of the
held-out ones.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_nullspace.evaluation.evaluate import BaseReference, EvaluationSettings, describe, evaluate_model
from trl_nullspace.evaluation.judges import ClassifierJudge, RefusalJudge, prefix_judge
from trl_nullspace.evaluation.splits import development_sets, held_out_sets

QUICK_SIZE = 32

# (label, getter) for the summary table; rates are shown as percentages, the rest as numbers.
SUMMARY_ROWS: list[tuple[str, str, Any]] = [
    ("refusal, Do-Not-Answer held-out ↑", "rate", lambda e: e["refusal"].get("do-not-answer")),
    ("refusal, HarmBench ↑", "rate", lambda e: e["refusal"].get("harmbench")),
    ("over-refusal, benign look-alikes ↓", "rate", lambda e: e["over_refusal"]["look-alikes"]["all"]),
    ("over-refusal, general requests ↓", "rate", lambda e: e["over_refusal"]["general"]),
    ("KL from base on general answers ↓", "number", lambda e: e["drift"]["kl_general"]),
    ("greedy general answers unchanged ↑", "rate", lambda e: e["drift"]["same_answers"]),
    ("HumanEval solution NLL (rise) ↓", "number", lambda e: e["drift"]["nll_code"]),
    ("book prose NLL (rise) ↓", "number", lambda e: e["drift"]["nll_prose"]),
]


def _cell(kind: str, value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.1%}" if kind == "rate" else f"{value:.4f}"


def summary_table(model_name: str, evaluation: dict[str, Any], base: dict[str, Any]) -> str:
    """Base and model side by side, one metric per row."""
    lines = [f"| metric | base | {model_name} |", "|---|---|---|"]
    for label, kind, get in SUMMARY_ROWS:
        lines.append(f"| {label} | {_cell(kind, get(base))} | {_cell(kind, get(evaluation))} |")
    return "\n".join(lines) + "\n"


def save_plot(model_name: str, evaluation: dict[str, Any], base: dict[str, Any], path: str) -> str | None:
    """The table's rates as bars, base beside the model, the drift numbers in the title; None without
    matplotlib (`pip install matplotlib`), which the package does not require."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(label, get) for label, kind, get in SUMMARY_ROWS if kind == "rate" and get(evaluation) is not None]
    figure, axis = plt.subplots(figsize=(9, 4.5))
    for offset, (name, values) in enumerate((("base", base), (model_name, evaluation))):
        heights = [get(values) or 0.0 for _, get in rows]
        bars = axis.bar([index + offset * 0.4 for index in range(len(rows))], heights, 0.4, label=name)
        axis.bar_label(bars, labels=[f"{height:.0%}" for height in heights], fontsize=8)
    axis.set_xticks([index + 0.2 for index in range(len(rows))])
    axis.set_xticklabels([label.replace(", ", ",\n", 1) for label, _ in rows], fontsize=8)
    axis.set_ylim(0, 1.2)
    axis.set_ylabel("rate")
    drift = evaluation["drift"]
    axis.set_title(f"{model_name} against its base: KL on general answers {drift['kl_general']:.4f}", fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def run_evaluation(
    model_path: str,
    base_path: str,
    output_dir: str | None = None,
    max_items: int | None = None,
    development: bool = False,
    judge: RefusalJudge = prefix_judge,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Evaluate `model_path` against `base_path`; writes `evaluation.{json,md,png}` to `output_dir` if given.

    `max_items` caps every set (evenly spaced items), for smoke tests."""
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    base = AutoModelForCausalLM.from_pretrained(base_path)
    sets = development_sets() if development else held_out_sets()
    if max_items is not None:
        sets = sets.subsample(max_items)
    reference = BaseReference.compute(base, tokenizer, sets, EvaluationSettings(show_progress=show_progress), judge)
    del base
    model = AutoModelForCausalLM.from_pretrained(model_path)
    evaluation = evaluate_model(model, tokenizer, reference, judge)
    result = {
        "model": model_path,
        "base": base_path,
        "sets": "development" if development else "held-out",
        "max_items": max_items,
        "measured": describe(reference, judge),
        "base_evaluation": reference.evaluation,
        "evaluation": evaluation,
    }
    name = os.path.basename(model_path.rstrip("/")) or model_path
    table = summary_table(name, evaluation, reference.evaluation)
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        if save_plot(name, evaluation, reference.evaluation, os.path.join(output_dir, "evaluation.png")) is None:
            print("no evaluation.png: matplotlib is not installed (pip install matplotlib)")
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "evaluation.json"), "w") as handle:
            json.dump(result, handle, indent=1)
        with open(os.path.join(output_dir, "evaluation.md"), "w") as handle:
            handle.write(
                f"# Evaluation of {model_path} against {base_path}\n\n{table}\n{result['measured']['refusal_rule']}\n"
            )
    print(table)
    print(result["measured"]["refusal_rule"])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="trl-nullspace evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="the trained model's folder")
    parser.add_argument("--base", required=True, help="the model it was trained from (folder or Hub name)")
    parser.add_argument("--output-dir", help="write evaluation.json, evaluation.md and evaluation.png here")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help=f"at most {QUICK_SIZE} items per set (smoke test)")
    size.add_argument("--max-items", type=int, help="at most this many items per set (smoke test)")
    parser.add_argument("--development", action="store_true", help="the development sets (for tuning)")
    parser.add_argument("--refusal-classifier", help="a local sequence-classifier folder that judges refusals")
    parser.add_argument("--refusal-label", help="the classifier's label (name or index) that means refused")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    options = parser.parse_args(argv)
    judge: RefusalJudge = prefix_judge
    if options.refusal_classifier:
        if options.refusal_label is None:
            parser.error("--refusal-classifier needs --refusal-label.")
        label = int(options.refusal_label) if options.refusal_label.isdigit() else options.refusal_label
        judge = ClassifierJudge(options.refusal_classifier, label)
    run_evaluation(
        options.model,
        options.base,
        options.output_dir,
        max_items=QUICK_SIZE if options.quick else options.max_items,
        development=options.development,
        judge=judge,
        show_progress=not options.no_progress,
    )
    return 0
