"""`make bench-freed`: what a rank rule leaves free, read before any training.

A rule that frees 1% of the reference energy can free very different things. This estimates the
default subspace (energy 0.99, tokens normalised) and the contrastive rule's with the same budget
contrasted with the harmful training requests alone (`--sweep harm-contrast`'s setting) on
SmolLM2-135M-Instruct, and measures, per layer input, the share of each set's input energy that
lies *outside* the protected bases (what an update may move):

- the general reference data (whole conversations: what the budget is counted on);
- the general reference data's user turns alone (prompt tokens, as the contrast data are);
- the harmful training requests (the contrast data);
- the proxy's unseen area recast in HarmBench's form (development proxy; what refusal must reach).

Development data only; no held-out item is read.

    python -m benchmarks.freed_energy [--output-dir docs/results]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import datasets
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.real import BASE_ANSWERS_CACHE, machine_name, write_results
from benchmarks.unseen_harm import UNSEEN_IMPERATIVE, proxy_sets
from trl_nullspace.config import NullSpaceArguments
from trl_nullspace.data.gguf import SMOLLM2_DIR, materialise_smollm2
from trl_nullspace.estimation.activation import energy_in_span
from trl_nullspace.estimation.estimate import estimate_subspace
from trl_nullspace.estimation.reference import tokenize_reference
from trl_nullspace.evaluation.splits import training_side
from trl_nullspace.evaluation.training_data import build_real_data
from trl_nullspace.projection.targets import find_target_linears

RULES = {"default (energy 0.99)": False, "harm-only contrast (energy 0.99)": True}
LAYER_TYPES = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


def format_report(result: dict) -> str:
    sets = list(result["sets"])
    lines = [
        "# What a rank rule leaves free, before training (`make bench-freed`)",
        "",
        f"SmolLM2-135M-Instruct on {result['machine']}, {result['seconds']:.0f} s. Per layer input, the share of "
        "each set's input energy (tokens normalised) outside the protected bases, i.e. what an update may move; "
        "each cell: mean over the layer inputs of that type (all: over every layer input). Sets: "
        + "; ".join(f"{name} ({count} examples)" for name, count in result["sets"].items())
        + ". Development data only.",
        "",
        "| rule | layer inputs | " + " | ".join(sets) + " |",
        "|---|---|" + "---|" * len(sets),
    ]
    for rule, shares in result["free"].items():
        for layer_type in ("all", *LAYER_TYPES):
            keys = [key for key in shares[sets[0]] if layer_type == "all" or key.endswith(layer_type)]
            cells = [f"{statistics.mean(shares[name][key] for key in keys):.2%}" for name in sets]
            lines.append(f"| {rule} | {layer_type} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=SMOLLM2_DIR)
    parser.add_argument("--output-dir", default="docs/results")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    path = materialise_smollm2(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    data = build_real_data(model, tokenizer, BASE_ANSWERS_CACHE, show_progress=False)
    defaults = NullSpaceArguments()

    def batches(dataset: datasets.Dataset):
        size, length = defaults.nullspace_reference_batch_size, defaults.nullspace_reference_max_length
        return tokenize_reference(dataset, tokenizer, size, length, defaults.nullspace_reference_num_samples)

    reference = data.references["general"]
    harmful = data.exempt_prompts.select([i for i, flag in enumerate(data.exempt_prompts["harmful"]) if flag])
    unseen = proxy_sets(training_side().harmful_train[:200]).harmful[UNSEEN_IMPERATIVE]
    sets = {
        "general conversations": reference,
        "general user turns": datasets.Dataset.from_list([{"prompt": row["messages"][:1]} for row in reference]),
        "harmful training requests": harmful.select_columns(["prompt"]),
        "unseen area, HarmBench's form": datasets.Dataset.from_list(
            [{"prompt": [{"role": "user", "content": prompt.text}]} for prompt in unseen]
        ),
    }
    tokenized = {name: batches(dataset) for name, dataset in sets.items()}
    linears = find_target_linears(model, None)
    free: dict[str, dict[str, dict[str, float]]] = {}
    for rule, contrastive in RULES.items():
        settings = NullSpaceArguments(nullspace_contrastive=contrastive)
        contrast = tokenized["harmful training requests"] if contrastive else None
        subspace = estimate_subspace(model, tokenized["general conversations"], settings, True, contrast)
        free[rule] = {}
        for name, each in tokenized.items():
            held = energy_in_span(model, each, linears, subspace, normalize_tokens=True)
            free[rule][name] = {key: 1.0 - share for key, share in held.items()}
    result = {
        "machine": machine_name("cpu"),
        "seconds": time.perf_counter() - started,
        "sets": {name: len(dataset) for name, dataset in sets.items()},
        "free": free,
    }
    write_results(result, os.path.join(args.output_dir, "freed_energy_cpu"), format_report)


if __name__ == "__main__":
    main()
