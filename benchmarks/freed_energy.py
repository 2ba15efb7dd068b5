"""`make bench-freed`: what a rank rule leaves free, read before any training.

A rule that frees 1% of the reference energy can free very different things. On
SmolLM2-135M-Instruct, from one set of per-layer-input statistics (tokens normalised), this builds
three protected bases with the same budget (1% of the general reference data's energy left free)
and measures, per layer input, the share of each set's input energy that lies *outside* them (what
an update may move):

- rules: the default (energy 0.99); the contrastive rule contrasted with the harmful training
  requests alone (`--sweep harm-contrast`'s setting); and two **same-role** prototypes, both freed
  while the reference data's energy in them stays within the budget: directions ordered by harmful
  requests' energy per unit of general *prompts'* energy (`same_role_basis`), and by harmful
  requests' energy beyond general prompts' (`difference_basis`);
- sets: the general reference data (whole conversations: what the budget is counted on), its user
  turns alone (prompt tokens, as the contrast data are), the harmful training requests (the
  contrast data) and the proxy's unseen area recast in HarmBench's form (what refusal must reach).

Development data only; no held-out item is read.

    python -m benchmarks.freed_energy [--output-dir docs/results]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import datasets
import torch
from tqdm.auto import tqdm

from benchmarks.basis_precision import DEFAULT, missed, statistics_of
from benchmarks.real import PRESETS, load_model_and_data, machine_name, trainer_reference_batches, write_results
from benchmarks.unseen_harm import UNSEEN_IMPERATIVE, proxy_sets
from trl_nullspace.data.gguf import SMOLLM2_DIR
from trl_nullspace.estimation.activation import contrastive_basis, top_eigenvectors
from trl_nullspace.evaluation.splits import training_side
from trl_nullspace.projection.targets import find_target_linears

LAYER_TYPES = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


def same_role_basis(reference: torch.Tensor, baseline: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """The protected basis that frees the directions `contrast` (harmful prompts) uses most per unit of
    `baseline` (general prompts: the same role), for as long as `reference`'s energy in them stays within
    the default's budget (1 − 0.99). The complement of the freed span, orthonormal (fp64)."""
    dimension = reference.shape[0]
    identity = torch.eye(dimension, dtype=torch.float64)
    reference, baseline, contrast = (matrix / matrix.trace() for matrix in (reference, baseline, contrast))
    cholesky = torch.linalg.cholesky(baseline + 1e-9 * identity)
    whitened = torch.linalg.solve_triangular(
        cholesky, torch.linalg.solve_triangular(cholesky, contrast, upper=False).T, upper=False
    )
    vectors = torch.linalg.eigh((whitened + whitened.T) / 2)[1].flip(1)
    ordered = torch.linalg.qr(torch.linalg.solve_triangular(cholesky.T, vectors, upper=True)).Q
    leaked = torch.cumsum(((reference @ ordered) * ordered).sum(0), 0)
    free = int((leaked <= 1.0 - DEFAULT.energy + 1e-12).sum().item())
    return ordered[:, free:]


def difference_basis(reference: torch.Tensor, baseline: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """The protected basis that frees the directions where `contrast` (harmful prompts) carries the most
    energy *beyond* `baseline` (general prompts), each statistic normalised to unit trace: the leading
    eigenvectors of their difference with a positive eigenvalue, for as long as `reference`'s energy in
    them stays within the default's budget. The complement of the freed span, orthonormal (fp64)."""
    reference, baseline, contrast = (matrix / matrix.trace() for matrix in (reference, baseline, contrast))
    values, vectors = torch.linalg.eigh(contrast - baseline)
    values, ordered = values.flip(0), vectors.flip(1)
    leaked = torch.cumsum(((reference @ ordered) * ordered).sum(0), 0)
    free = int(((leaked <= 1.0 - DEFAULT.energy + 1e-12) & (values > 0)).cumprod(0).sum().item())
    return ordered[:, free:]


def protected_bases(by_set: dict[str, dict[str, torch.Tensor]], key: str) -> dict[str, torch.Tensor]:
    """Each rule's protected basis of layer input `key`."""
    reference = by_set["general conversations"][key]
    harmful = by_set["harmful training requests"][key]
    return {
        "default (energy 0.99)": top_eigenvectors(reference, DEFAULT)[0],
        "harm-only contrast (energy 0.99)": contrastive_basis(reference, harmful, DEFAULT)[0],
        "same-role contrast, prototype (energy 0.99)": same_role_basis(
            reference, by_set["general user turns"][key], harmful
        ),
        "same-role difference, prototype (energy 0.99)": difference_basis(
            reference, by_set["general user turns"][key], harmful
        ),
    }


def format_report(result: dict) -> str:
    sets = list(result["sets"])
    lines = [
        "# What a rank rule leaves free, before training (`make bench-freed`)",
        "",
        f"SmolLM2-135M-Instruct on {result['machine']}, {result['seconds']:.0f} s. Per layer input, the share of "
        "each set's input energy (tokens normalised) outside each rule's protected bases, i.e. what an update may "
        "move (every rule leaves 1% of the general conversations' energy free; the same-role rules are "
        "prototypes in `benchmarks/freed_energy.py`, not options); "
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
    preset = PRESETS["cpu"]
    model, tokenizer, data = load_model_and_data(preset, args.model_dir)
    reference = data.references["general"]
    harmful = data.exempt_prompts.select([i for i, flag in enumerate(data.exempt_prompts["harmful"]) if flag])
    unseen = proxy_sets(training_side().harmful_train[: preset.harmful_examples]).harmful[UNSEEN_IMPERATIVE]
    sets = {
        "general conversations": reference,
        "general user turns": datasets.Dataset.from_list([{"prompt": row["messages"][:1]} for row in reference]),
        "harmful training requests": harmful.select_columns(["prompt"]),
        "unseen area, HarmBench's form": datasets.Dataset.from_list(
            [{"prompt": [{"role": "user", "content": prompt.text}]} for prompt in unseen]
        ),
    }
    linears = find_target_linears(model, None)
    by_set = {
        name: statistics_of(model, trainer_reference_batches(dataset, tokenizer), linears)
        for name, dataset in tqdm(sets.items())
    }
    free: dict[str, dict[str, dict[str, float]]] = {}
    for key in tqdm(sorted(by_set["general conversations"]), desc="layer inputs"):
        for rule, basis in protected_bases(by_set, key).items():
            for name in sets:
                free.setdefault(rule, {}).setdefault(name, {})[key] = missed(basis, by_set[name][key])
    result = {
        "machine": machine_name("cpu"),
        "seconds": time.perf_counter() - started,
        "sets": {name: len(dataset) for name, dataset in sets.items()},
        "free": free,
    }
    write_results(result, os.path.join(args.output_dir, "freed_energy_cpu"), format_report)


if __name__ == "__main__":
    main()
