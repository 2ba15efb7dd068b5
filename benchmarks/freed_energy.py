"""`make bench-freed`: what a rank rule leaves free, read before any training.

A rule that frees 1% of the reference energy can free very different things. On
SmolLM2-135M-Instruct, from one set of per-layer-input statistics (tokens normalised), this builds
each rule's free operator with the same budget (1% of the general reference data's energy left free)
and measures, per layer input, the share of each set's input energy it lets through (what an update
may move; for a protected basis `U`, the energy outside it):

- rules: the default (energy 0.99); the contrastive rule contrasted with the harmful training
  requests alone (`--sweep harm-contrast`'s setting); two **same-role** prototypes, both freed
  while the reference data's energy in them stays within the budget: directions ordered by harmful
  requests' energy per unit of general *prompts'* energy (`same_role_basis`), and by harmful
  requests' energy beyond general prompts' (`difference_basis`); and the **soft projector**
  prototype (#27's lever 3), which damps every direction of the reference statistic by
  `μ / (λᵢ + μ)` instead of cutting at an energy (`soft_free_operator`);
- sets: the general reference data (whole conversations: what the budget is counted on), its user
  turns alone (prompt tokens, as the contrast data are), the harmful training requests (the
  contrast data) and the proxy's unseen area recast in HarmBench's form (what refusal must reach).

Development data only; no held-out item is read.

    python -m benchmarks.freed_energy [--output-dir docs/results]
"""

from __future__ import annotations

import os
import statistics
import time

import datasets
import torch
from tqdm.auto import tqdm

from benchmarks.basis_precision import DEFAULT, statistics_of
from benchmarks.real import (
    PRESETS,
    driver_parser,
    load_model_and_data,
    machine_name,
    trainer_reference_batches,
    write_results,
)
from benchmarks.unseen_harm import UNSEEN_IMPERATIVE, proxy_sets
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


def soft_free_operator(reference: torch.Tensor, budget: float = 1.0 - DEFAULT.energy) -> torch.Tensor:
    """The soft projector `F = μ (C + μI)⁻¹` of the reference statistic `C` (unit trace), with μ such
    that the reference's energy it lets through, `tr(F C F)`, equals `budget` (bisection on log μ; that
    share grows with μ). Every direction is damped by `μ / (λᵢ + μ)` instead of kept or cut (fp64)."""
    values, vectors = torch.linalg.eigh(reference.double() / reference.trace())
    values = values.clamp_min(0)

    def leaked(mu: float) -> float:
        return float((values * (mu / (values + mu)) ** 2).sum())

    low, high = 1e-14, 1.0
    for _ in range(100):
        middle = (low * high) ** 0.5
        low, high = (middle, high) if leaked(middle) < budget else (low, middle)
    mu = (low * high) ** 0.5
    return (vectors * (mu / (values + mu))) @ vectors.T


def free_share(free: torch.Tensor, statistic: torch.Tensor) -> float:
    """The share of `statistic`'s energy an update may move through the free operator `F`: `tr(F S F) / tr(S)`
    (for a hard rule `F = I − U Uᵀ`, the energy outside span(U))."""
    return float((free @ statistic.double() @ free).trace() / statistic.trace())


def free_operators(by_set: dict[str, dict[str, torch.Tensor]], key: str) -> dict[str, torch.Tensor]:
    """Each rule's free operator of layer input `key`: `I − U Uᵀ` for a protected basis `U`, or the soft
    projector."""
    reference = by_set["general conversations"][key]
    harmful = by_set["harmful training requests"][key]
    bases = {
        "default (energy 0.99)": top_eigenvectors(reference, DEFAULT)[0],
        "harm-only contrast (energy 0.99)": contrastive_basis(reference, harmful, DEFAULT)[0],
        "same-role contrast, prototype (energy 0.99)": same_role_basis(
            reference, by_set["general user turns"][key], harmful
        ),
        "same-role difference, prototype (energy 0.99)": difference_basis(
            reference, by_set["general user turns"][key], harmful
        ),
    }
    identity = torch.eye(reference.shape[0], dtype=torch.float64)
    operators = {rule: identity - basis.double() @ basis.double().T for rule, basis in bases.items()}
    operators["soft projector, prototype (1% of the reference energy)"] = soft_free_operator(reference)
    return operators


def format_report(result: dict) -> str:
    sets = list(result["sets"])
    lines = [
        "# What a rank rule leaves free, before training (`make bench-freed`)",
        "",
        f"SmolLM2-135M-Instruct on {result['machine']}, {result['seconds']:.0f} s. Per layer input, the share of "
        "each set's input energy (tokens normalised) outside each rule's protected bases, i.e. what an update may "
        "move (every rule leaves 1% of the general conversations' energy free; the same-role rules and the soft "
        "projector are prototypes in `benchmarks/freed_energy.py`, not options); "
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
    parser = driver_parser(__doc__, ("cpu",), "cpu")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    preset = PRESETS[args.preset]
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
        for rule, operator in free_operators(by_set, key).items():
            for name in sets:
                free.setdefault(rule, {}).setdefault(name, {})[key] = free_share(operator, by_set[name][key])
    result = {
        "machine": machine_name("cpu"),
        "seconds": time.perf_counter() - started,
        "sets": {name: len(dataset) for name, dataset in sets.items()},
        "free": free,
    }
    write_results(result, os.path.join(args.output_dir, "freed_energy_cpu"), format_report)


if __name__ == "__main__":
    main()
