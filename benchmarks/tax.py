"""`make bench-tax`: the alignment tax of safety SFT, per method, over several seeds.

Same base model (a tiny Qwen2 given a general skill here), same safety data, optimizer and budget
for every row; only the method changes:

- plain TRL `SFTTrainer` (all parameters);
- null-space, activation subspace, `gradient` target (the papers' projection);
- null-space, activation subspace, `update` target (the default when this table was measured);
- gradient subspace (OGPSA-style: reference-gradient basis, `gradient` target);
- LoRA with plain TRL;
- LoRA with its `A` in the activation null space.

Measured per row: refusal on held-out harmful prompts, over-refusal on benign look-alikes, general
accuracy before and after, perplexity on held-out general text, the KL divergence of next-token
distributions from the base model on held-out general prompts, and wall time. Mean ± standard
deviation over seeds, as a Markdown table, a JSON file of every seed's numbers, and a Pareto plot
(general skill kept vs refusal) in `docs/results/`.

    python -m benchmarks.tax [--seeds 0 1 2] [--output-dir docs/results]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time

import datasets
import torch
from peft import LoraConfig
from transformers.utils import logging
from trl import SFTConfig, SFTTrainer

from trl_nullspace import NullSpaceSFTConfig, NullSpaceSFTTrainer
from trl_nullspace.data import toy
from trl_nullspace.demo.evaluate import general_accuracy, refusal_rate
from trl_nullspace.demo.pipelines import common_training_arguments
from trl_nullspace.demo.pretrain import encode_for_training, pretrain_general_skill

# The committed table was measured before per-token normalisation became the default.
RAW_STATISTICS = {"nullspace_normalize_tokens": False}
METHODS = {
    "plain TRL": {},
    "null-space (activation, gradient target)": {"nullspace_projection_target": "gradient", **RAW_STATISTICS},
    "null-space (activation, update target)": {"nullspace_projection_target": "update", **RAW_STATISTICS},
    "gradient subspace (OGPSA-style)": {"nullspace_method": "gradient", "nullspace_projection_target": "gradient"},
    "LoRA, plain TRL": {"lora": True},
    "LoRA in null space": {"lora": True, "nullspace_projection_target": "update", **RAW_STATISTICS},
}
METRICS = [
    ("refusal_harmful", "refusal ↑", "{:.1%}"),
    ("over_refusal_benign", "over-refusal ↓", "{:.1%}"),
    ("general_accuracy", "general accuracy ↑", "{:.1%}"),
    ("general_perplexity", "general perplexity ↓", "{:.3f}"),
    ("kl_from_base", "KL from base ↓", "{:.4f}"),
    ("seconds", "wall time (s)", "{:.1f}"),
]


@torch.no_grad()
def general_perplexity_and_kl(model, base, tokenizer, examples: list[toy.Example]) -> tuple[float, float]:
    """Perplexity of held-out general completions, and mean KL(base ‖ model) over every real position."""
    batch = encode_for_training(examples, tokenizer)
    model.eval()
    base.eval()
    outputs = model(**batch)
    mask = batch["attention_mask"].bool()
    log_probs = outputs.logits.log_softmax(-1)[mask]
    base_log_probs = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
    base_log_probs = base_log_probs[mask]
    kl = (base_log_probs.exp() * (base_log_probs - log_probs)).sum(-1).mean().item()
    return float(torch.exp(outputs.loss)), kl


def train_variant(name: str, base, tokenizer, train: datasets.Dataset, reference, seed: int, workdir: str):
    """Safety SFT of a copy of `base` with one method; returns the trained model."""
    settings = dict(METHODS[name])
    lora = settings.pop("lora", False)
    common = {
        **common_training_arguments(seed),  # the demo's: AdamW, weight decay 0.1, constant lr, fp32 CPU
        "output_dir": os.path.join(workdir, name.replace(" ", "_")),
        "num_train_epochs": 40,
        "learning_rate": 3e-3,
    }
    extra = {"peft_config": LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")} if lora else {}
    if name.startswith("plain") or name == "LoRA, plain TRL":
        trainer = SFTTrainer(
            model=copy.deepcopy(base),
            args=SFTConfig(**common),
            train_dataset=train,
            processing_class=tokenizer,
            **extra,
        )
    else:
        trainer = NullSpaceSFTTrainer(
            model=copy.deepcopy(base),
            args=NullSpaceSFTConfig(**common, nullspace_energy=0.99, **settings),
            train_dataset=train,
            processing_class=tokenizer,
            reference_dataset=reference,
            **extra,
        )
    trainer.train()
    return trainer.model


def run_seed(seed: int, workdir: str) -> dict[str, dict[str, float]]:
    torch.manual_seed(seed)
    tokenizer = toy.build_char_tokenizer()
    base = toy.build_tiny_qwen2(tokenizer, hidden_size=64, num_layers=2, intermediate_size=128, seed=seed)
    pretrain_general_skill(base, tokenizer, steps=1500, seed=seed)
    general_test = toy.general_examples(300, seed=seed + 999)
    split = toy.safety_split(seed=seed)
    train = datasets.Dataset.from_dict(toy.as_prompt_completion(split["train"]))
    reference = datasets.Dataset.from_dict(toy.as_text(toy.general_examples(256, seed=seed + 555)))
    before = general_accuracy(base, tokenizer, general_test)

    rows = {}
    for name in METHODS:
        started = time.perf_counter()
        model = train_variant(name, base, tokenizer, train, reference, seed, workdir)
        seconds = time.perf_counter() - started
        perplexity, kl = general_perplexity_and_kl(model, base, tokenizer, general_test)
        rows[name] = {
            "refusal_harmful": refusal_rate(model, tokenizer, split["harmful_test"]),
            "over_refusal_benign": refusal_rate(model, tokenizer, split["benign_test"]),
            "general_accuracy_before": before,
            "general_accuracy": general_accuracy(model, tokenizer, general_test),
            "general_perplexity": perplexity,
            "kl_from_base": kl,
            "seconds": seconds,
        }
        print(json.dumps({"seed": seed, "method": name, **rows[name]}), flush=True)
    return rows


def summarise(per_seed: dict[int, dict[str, dict[str, float]]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Mean and standard deviation over seeds of every metric, per method."""
    summary = {}
    for name in METHODS:
        summary[name] = {}
        for key in [key for key, _, _ in METRICS] + ["general_accuracy_before"]:
            values = [rows[name][key] for rows in per_seed.values()]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[name][key] = (statistics.mean(values), spread)
    return summary


def format_table(summary, seeds: list[int]) -> str:
    lines = [
        f"# Alignment tax of safety SFT (toy model, seeds {seeds}, mean ± std)",
        "",
        "Command: `make bench-tax` (`python -m benchmarks.tax`). Every row: same pretrained tiny Qwen2, same "
        "safety data, AdamW lr 3e-3 with weight decay 0.1, 40 epochs; null-space rows use energy 0.99 from 256 "
        "general reference examples. Per-seed numbers: `tax.json`.",
        "",
        "| method | " + " | ".join(title for _, title, _ in METRICS) + " | general accuracy before |",
        "|" + "---|" * (len(METRICS) + 2),
    ]
    for name, metrics in summary.items():
        cells = [f"{fmt.format(metrics[key][0])} ± {fmt.format(metrics[key][1])}" for key, _, fmt in METRICS]
        before = metrics["general_accuracy_before"][0]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {before:.1%} |")
    return "\n".join(lines) + "\n"


def save_pareto(summary, path: str) -> None:
    """General accuracy kept (x) against refusal (y), one point per method with its spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 5))
    for (name, metrics), marker in zip(summary.items(), "osD^vP", strict=True):
        (x, x_err), (y, y_err) = metrics["general_accuracy"], metrics["refusal_harmful"]
        axis.errorbar(x, y, xerr=x_err, yerr=y_err, fmt=marker, markersize=9, capsize=3, alpha=0.8, label=name)
    axis.set_xlabel("general accuracy after safety SFT ↑")
    axis.set_ylabel("refusal on held-out harmful prompts ↑")
    axis.set_xlim(-0.05, 1.05)
    axis.set_ylim(-0.05, 1.05)
    axis.set_title("Alignment tax: the top right keeps skill and refuses")
    axis.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output-dir", default="docs/results")
    arguments = parser.parse_args()
    logging.set_verbosity_error()
    datasets.disable_progress_bars()
    os.makedirs(arguments.output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        per_seed = {seed: run_seed(seed, workdir) for seed in arguments.seeds}
    summary = summarise(per_seed)
    with open(os.path.join(arguments.output_dir, "tax.json"), "w") as handle:
        json.dump({"seeds": arguments.seeds, "per_seed": per_seed}, handle, indent=1)
    table = format_table(summary, arguments.seeds)
    with open(os.path.join(arguments.output_dir, "tax.md"), "w") as handle:
        handle.write(table)
    save_pareto(summary, os.path.join(arguments.output_dir, "tax.png"))
    print(table)


if __name__ == "__main__":
    main()
