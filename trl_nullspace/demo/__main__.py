"""End-to-end demo on CPU: plain TRL SFT vs null-space SFT, measured in the same run.

1. Build a tiny Qwen2 and give it a general skill (digit tasks) by training it here.
2. Safety-SFT copies of it to refuse a generated class of harmful requests (and still answer
   benign look-alikes), once with `trl.SFTTrainer` and once with `NullSpaceSFTTrainer`.
3. Print and save a table (refusal, over-refusal, general accuracy before/after, wall time) and a plot.

    python -m trl_nullspace.demo [--output-dir outputs/demo] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import datasets
import torch
from transformers.utils import logging
from trl import SFTConfig, SFTTrainer

from trl_nullspace import NullSpaceSFTConfig, NullSpaceSFTTrainer, toy
from trl_nullspace.demo.evaluate import general_accuracy, refusal_rate
from trl_nullspace.demo.pretrain import pretrain_general_skill
from trl_nullspace.demo.report import format_table, save_plot


def safety_training_arguments(output_dir: str, epochs: int, seed: int) -> dict:
    """The same budget for every variant: AdamW with weight decay, fp32 on CPU."""
    return dict(
        output_dir=output_dir,
        num_train_epochs=epochs,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        weight_decay=0.1,
        lr_scheduler_type="constant",
        report_to="none",
        save_strategy="no",
        logging_steps=10,
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        seed=seed,
    )


def evaluate(model, tokenizer, general_test, split) -> dict[str, float]:
    return {
        "refusal_harmful": refusal_rate(model, tokenizer, split["harmful_test"]),
        "over_refusal_benign": refusal_rate(model, tokenizer, split["benign_test"]),
        "general_accuracy": general_accuracy(model, tokenizer, general_test),
    }


def run_demo(output_dir: str, quick: bool = False, seed: int = 0) -> list[dict]:
    """Run the whole demo; returns one row of measured metrics per model."""
    torch.manual_seed(seed)
    tokenizer = toy.build_char_tokenizer()
    base = toy.build_tiny_qwen2(tokenizer, hidden_size=64, num_layers=2, intermediate_size=128, seed=seed)
    started = time.perf_counter()
    pretrain_general_skill(base, tokenizer, steps=300 if quick else 1500, seed=seed)
    pretrain_seconds = time.perf_counter() - started

    general_test = toy.general_examples(60 if quick else 300, seed=seed + 999)
    split = toy.safety_split(seed=seed)
    safety_train = datasets.Dataset.from_dict(toy.as_prompt_completion(split["train"]))
    reference = datasets.Dataset.from_dict(toy.as_text(toy.general_examples(256, seed=seed + 555)))
    epochs = 10 if quick else 40

    base_metrics = evaluate(base, tokenizer, general_test, split)
    rows = [{"model": "base (before safety training)", **base_metrics, "seconds": pretrain_seconds}]
    variants = [
        ("plain TRL SFTTrainer", SFTTrainer, SFTConfig, {}, {}),
        (
            "NullSpaceSFTTrainer (activation, update)",
            NullSpaceSFTTrainer,
            NullSpaceSFTConfig,
            {"nullspace_energy": 0.99},
            {"reference_dataset": reference},
        ),
    ]
    for name, trainer_class, config_class, nullspace_fields, extra in variants:
        model = copy.deepcopy(base)
        arguments = safety_training_arguments(os.path.join(output_dir, "runs", trainer_class.__name__), epochs, seed)
        started = time.perf_counter()
        trainer = trainer_class(
            model=model,
            args=config_class(**arguments, **nullspace_fields),
            train_dataset=safety_train,
            processing_class=tokenizer,
            **extra,
        )
        trainer.train()
        seconds = time.perf_counter() - started
        metrics = evaluate(trainer.model, tokenizer, general_test, split)
        before = base_metrics["general_accuracy"]
        rows.append({"model": name, **metrics, "general_accuracy_before": before, "seconds": seconds})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--quick", action="store_true", help="Smaller run, for smoke tests (about a minute).")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    logging.set_verbosity_error()
    datasets.disable_progress_bars()
    os.makedirs(options.output_dir, exist_ok=True)
    rows = run_demo(options.output_dir, quick=options.quick, seed=options.seed)
    table = format_table(rows)
    print(table)
    with open(os.path.join(options.output_dir, "results.md"), "w") as handle:
        handle.write(table + "\n")
    with open(os.path.join(options.output_dir, "results.json"), "w") as handle:
        json.dump(rows, handle, indent=2)
    plot = save_plot(rows, os.path.join(options.output_dir, "demo.png"))
    print(f"\nSaved {options.output_dir}/results.md, results.json and {plot}")


if __name__ == "__main__":
    main()
