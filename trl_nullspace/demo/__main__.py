"""End-to-end demo on CPU: plain TRL trainers vs null-space trainers, measured in the same run.

1. Build a tiny Qwen2 and give it a general skill (digit tasks) by training it here.
2. Safety-train copies of it to refuse a generated class of harmful requests (and still answer
   benign look-alikes) with the chosen pipeline (SFT, SFT→DPO or SFT→GRPO), once with TRL's
   trainers and once with the null-space trainers, same data, optimizer and budget.
3. Print and save a table (refusal, over-refusal, general accuracy before/after, wall time) and a plot.

Each seed runs on one CPU thread with PyTorch's deterministic algorithms, so a seed's numbers do not
depend on the machine's core count (reductions split over threads sum in another order, and a
greedy answer can flip on a last bit). With several seeds the table gives each metric's mean and
its range over the seeds: what a fresh clone should print, within that range.

    python -m trl_nullspace.demo [--trainer sft|dpo|grpo] [--output-dir DIR] [--quick] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import time
from collections.abc import Iterator

import datasets
import torch
from transformers.utils import logging

from trl_nullspace.data import toy
from trl_nullspace.demo.evaluate import general_accuracy, refusal_rate
from trl_nullspace.demo.pipelines import build_pipeline, run_pipeline
from trl_nullspace.demo.pretrain import pretrain_general_skill
from trl_nullspace.demo.report import format_table, save_plot, summarise_seeds


def evaluate(model, tokenizer, general_test, split) -> dict[str, float]:
    return {
        "refusal_harmful": refusal_rate(model, tokenizer, split["harmful_test"]),
        "over_refusal_benign": refusal_rate(model, tokenizer, split["benign_test"]),
        "general_accuracy": general_accuracy(model, tokenizer, general_test),
    }


@contextlib.contextmanager
def one_deterministic_thread() -> Iterator[None]:
    """One CPU thread and deterministic algorithms inside, the caller's settings restored after."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def run_demo(output_dir: str, pipeline: str = "sft", quick: bool = False, seed: int = 0) -> list[dict]:
    """Run the whole demo for one seed; returns one row of measured metrics per model."""
    with one_deterministic_thread():
        rows = _run_demo(output_dir, pipeline, quick, seed)
    return [{**row, "cpu": cpu_model()} for row in rows]


def cpu_model() -> str:
    """The CPU's model name: a seed's numbers repeat on the same kind of CPU only, since CPU families
    run different floating-point kernels (measured: an AMD EPYC and the CPU of the committed quick
    demo differ by whole prompts at 16 prompts)."""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _run_demo(output_dir: str, pipeline: str, quick: bool, seed: int) -> list[dict]:
    torch.manual_seed(seed)
    tokenizer = toy.build_char_tokenizer()
    base = toy.build_tiny_qwen2(tokenizer, hidden_size=64, num_layers=2, intermediate_size=128, seed=seed)
    started = time.perf_counter()
    pretrain_general_skill(base, tokenizer, steps=300 if quick else 1500, seed=seed)
    pretrain_seconds = time.perf_counter() - started

    general_test = toy.general_examples(60 if quick else 300, seed=seed + 999)
    split = toy.safety_split(seed=seed)
    reference = datasets.Dataset.from_dict(toy.as_text(toy.general_examples(256, seed=seed + 555)))
    stages = build_pipeline(pipeline, split["train"], quick)

    base_metrics = evaluate(base, tokenizer, general_test, split)
    rows = [{"model": "base (before safety training)", **base_metrics, "seconds": pretrain_seconds}]
    stage_names = [stage.plain[0].__name__.removesuffix("Trainer") for stage in stages]
    for null_space in (False, True):
        variant = "null-space" if null_space else "plain TRL"
        started = time.perf_counter()

        def record(index: int, model, variant: str = variant, started: float = started) -> None:
            seconds = time.perf_counter() - started
            metrics = evaluate(model, tokenizer, general_test, split)
            name = f"{variant} {'→'.join(stage_names[: index + 1])}"
            before = base_metrics["general_accuracy"]
            rows.append({"model": name, **metrics, "general_accuracy_before": before, "seconds": seconds})

        run_pipeline(
            stages,
            copy.deepcopy(base),
            tokenizer,
            null_space=null_space,
            reference=reference,
            output_dir=os.path.join(output_dir, "runs", variant.replace(" ", "-")),
            seed=seed,
            after_stage=record,
        )
    return rows


def write_rows(rows: list[dict], output_dir: str) -> str:
    """Save `rows` as results.md and results.json in `output_dir`; returns the table."""
    table = format_table(rows)
    with open(os.path.join(output_dir, "results.md"), "w") as handle:
        handle.write(table + "\n")
    with open(os.path.join(output_dir, "results.json"), "w") as handle:
        json.dump(rows, handle, indent=2)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainer", default="sft", choices=["sft", "dpo", "grpo"], help="sft, sft→dpo or sft→grpo")
    parser.add_argument("--output-dir", default=None, help="Default: outputs/demo/<trainer>.")
    parser.add_argument("--quick", action="store_true", help="Smaller run, for smoke tests (about a minute).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="Several: mean and range per metric.")
    options = parser.parse_args()
    logging.set_verbosity_error()
    datasets.disable_progress_bars()
    output_dir = options.output_dir or os.path.join("outputs", "demo", options.trainer)
    os.makedirs(output_dir, exist_ok=True)
    runs = {}
    for seed in options.seeds:
        seed_dir = os.path.join(output_dir, f"seed-{seed}")
        runs[seed] = run_demo(seed_dir, options.trainer, options.quick, seed)
        if len(options.seeds) > 1:
            write_rows(runs[seed], seed_dir)
    rows = runs[options.seeds[0]] if len(runs) == 1 else summarise_seeds(runs)
    print(write_rows(rows, output_dir))
    plot = save_plot(rows, os.path.join(output_dir, "demo.png"))
    print(f"\nSaved {output_dir}/results.md, results.json and {plot}")


if __name__ == "__main__":
    main()
