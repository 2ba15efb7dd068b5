"""`make bench-estimation`: the activation estimate's time and memory on a real model, by passes.

`nullspace_statistics_budget_gib` splits the estimate into passes over the reference data, whole
decoder layers each, so the fp64 statistics held at once fit the budget (83 GiB for a 7B shape
would fit no GPU). Each pass costs a forward pass over the reference set; each forward ends after
the pass' last layer (`_EndAfterTargets`), so pass p of P runs about p/P of the layers. This
measures both on SmolLM2-135M-Instruct (30 layers) with the benchmark's general-chat reference data:
one pass (the 135M model's statistics fit any budget), one pass per 5 layers and one per layer,
each with every forward run whole (as before ending early) and ended early. The bases must be the
same in every run; the table says how far apart they are.

    python -m benchmarks.estimation [--samples 64] [--output-dir docs/results]
"""

from __future__ import annotations

import os
import time

import torch
from tqdm.auto import tqdm

from benchmarks.real import (
    PRESETS,
    driver_parser,
    load_model_and_data,
    machine_name,
    trainer_reference_batches,
    write_results,
)
from trl_nullspace.estimation.activation import LayerOrder, collect_in_passes, statistic_bytes, top_eigenvectors
from trl_nullspace.estimation.modes import evaluating
from trl_nullspace.estimation.rank import RankSelection
from trl_nullspace.projection.targets import find_target_linears

LAYERS_PER_PASS = (None, 5, 1)  # None: one pass


def estimate(model, batches, linears, layers_per_pass: int | None, end_early: bool) -> dict:
    """The default estimate (energy 0.99, tokens normalised) in passes of `layers_per_pass` layers,
    timing the forward passes and the eigendecompositions apart."""
    per_layer = max(
        sum(statistic_bytes(name, module) for name, module in linears.items() if f".layers.{index}." in name)
        for index in range(model.config.num_hidden_layers)
    )
    budget = None if layers_per_pass is None else layers_per_pass * per_layer
    order = LayerOrder(model, list(linears), enabled=end_early)
    passes = collect_in_passes(model, batches, linears, True, None, budget, False, "", layer_order=order)
    bases, forward_s, eigh_s, held, count = {}, 0.0, 0.0, 0, 0
    selection = RankSelection(energy=0.99)
    with evaluating(model):
        started = time.perf_counter()
        for collector in passes:  # each step of the generator is one pass' forwards
            forward_s += time.perf_counter() - started
            count += 1
            held = max(held, sum(c.numel() * c.element_size() for c in collector.covariances.values()))
            started = time.perf_counter()
            for leader, covariance in collector.covariances.items():
                bases[leader] = top_eigenvectors(covariance, selection)[0]
            eigh_s += time.perf_counter() - started
            started = time.perf_counter()
    return {
        "passes": count,
        "forwards_ended_early": end_early,
        "forward_s": round(forward_s, 2),
        "eigh_s": round(eigh_s, 2),
        "total_s": round(forward_s + eigh_s, 2),
        "statistics_held_mib": round(held / 2**20, 1),
        "bases": bases,
    }


def projector_distance(one: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> float:
    """The largest difference between two estimates' projectors `U Uᵀ` (0: the same subspaces)."""
    assert one.keys() == other.keys()
    return max((one[key] @ one[key].T - other[key] @ other[key].T).abs().max().item() for key in one)


def format_report(result: dict) -> str:
    lines = [
        "# Estimation time by passes (`make bench-estimation`)",
        "",
        f"SmolLM2-135M-Instruct ({result['layers']} layers) on {result['machine']}, {result['reference_tokens']} "
        f"reference tokens ({result['samples']} general-chat examples), default estimate (energy 0.99, tokens "
        "normalised), fp32 weights. Measured in one run; `forward` is the forward passes over the reference data, "
        "`eigh` the fp64 eigendecompositions. Bases distance: the largest entry of `U Uᵀ` minus the one-pass "
        "estimate's.",
        "",
        "| passes | each forward | forward s | eigh s | total s | statistics held MiB | bases distance |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        ended = "ends after the pass' last layer" if row["forwards_ended_early"] else "whole"
        lines.append(
            f"| {row['passes']} | {ended} | {row['forward_s']} | {row['eigh_s']} | {row['total_s']} | "
            f"{row['statistics_held_mib']} | {row['bases_distance']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = driver_parser(__doc__, ("cpu",), "cpu")
    parser.add_argument("--samples", type=int, default=64, help="general-chat reference examples")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer, data = load_model_and_data(PRESETS[args.preset], args.model_dir)
    batches = trainer_reference_batches(data.references["general"], tokenizer, num_samples=args.samples)
    linears = find_target_linears(model, None)
    rows = []
    runs = [(layers, end_early) for layers in LAYERS_PER_PASS for end_early in (False, True)]
    for layers, end_early in tqdm(runs, desc="estimates"):
        rows.append(estimate(model, batches, linears, layers, end_early))
    one_pass = rows[0]["bases"]
    for row in rows:
        row["bases_distance"] = projector_distance(one_pass, row.pop("bases"))
    result = {
        "machine": machine_name("cpu"),
        "layers": model.config.num_hidden_layers,
        "samples": args.samples,
        "reference_tokens": sum(int(batch.attention_mask.sum()) for batch in batches),
        "rows": rows,
    }
    write_results(result, os.path.join(args.output_dir, "estimation_cpu"), format_report)


if __name__ == "__main__":
    main()
