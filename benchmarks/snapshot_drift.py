"""`make bench-snapshot-drift`: does projecting each step's change, instead of restoring the anchors, let
round-off accumulate inside the protected subspace?

Anchored projection, `M ← M − (M U − A) Uᵀ` with `A = M₀ U`, corrects every earlier step's round-off at
each step. Step snapshots (`nullspace_step_snapshot`, the default under FSDP2 and ZeRO-3) and complements
(`nullspace_basis_storage: smaller`) keep no `M₀ U`: each step removes only its own change's part in the
subspace, so the round-off of every step stays, and may add up over a run. This measures how much, with
the library's own projection code (`ConstrainedParameter`), on SmolLM2-135M-Instruct's real weights and
its real bases at the default estimate (the `bench-memory` cache), in fp32 as the masters are kept:
a run of optimizer-like steps (each element moved by ±lr, random signs, Adam's step at its start) of
each storage from the same weights, and at chosen steps the largest `|(M_t − M₀) U|`, the leak into the
subspace, against the bf16 rounding every forward pass applies to the same weights (half a bf16 ulp of
the largest weight).

    python -m benchmarks.snapshot_drift [--steps 1000] [--output-dir docs/results]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from benchmarks.memory import CACHE, require_cache
from benchmarks.real import machine_name, write_results
from trl_nullspace.data.gguf import SMOLLM2_DIR, materialise_smollm2
from trl_nullspace.projection.basis import SharedBasis
from trl_nullspace.projection.constrained import ConstrainedParameter
from trl_nullspace.storage.cache import load_subspace

WEIGHTS = ("model.layers.15.mlp.gate_proj", "model.layers.15.self_attn.o_proj")
LEARNING_RATE = 1.5e-4  # the SmolLM2 SFT recipe's rate: Adam moves each element by about this per step
STORAGES = {
    "anchors, U": dict(complement=False, step_snapshots=False),
    "step snapshots, U": dict(complement=False, step_snapshots=True),
    "complement, last projected": dict(complement=True, step_snapshots=False),
    "complement, step snapshots": dict(complement=True, step_snapshots=True),
}


def leak_over_steps(weight: torch.Tensor, basis: torch.Tensor, storage: dict, steps: int, marks: list[int]) -> dict:
    """Run `steps` sign-noise steps of `weight` under `storage`; the largest |(M_t − M₀) U| at each of `marks`."""
    parameter = torch.nn.Parameter(weight.clone())
    shared = SharedBasis(basis, complement=storage["complement"])
    item = ConstrainedParameter("weight", parameter, shared, flat=False, zero_anchor=False)
    item.step_snapshots = storage["step_snapshots"]
    item.reset_anchor()
    if storage["complement"] and not storage["step_snapshots"]:
        item.take_previous()  # the weights as last projected, kept between steps
    generator = torch.Generator().manual_seed(0)  # the same steps for every storage
    leaks = {}
    for step in range(1, steps + 1):
        if storage["step_snapshots"]:
            item.take_previous()
        with torch.no_grad():
            signs = torch.randint(0, 2, weight.shape, generator=generator).float() * 2 - 1
            parameter.add_(signs, alpha=LEARNING_RATE)
        item.enforce_anchor()
        if step in marks:
            leaks[step] = ((parameter.detach() - weight) @ basis).abs().max().item()
    return {"leak": leaks, "moved": (parameter.detach() - weight).abs().max().item()}


def bf16_half_ulp(value: float) -> float:
    """Half the spacing of bf16 numbers at `value`: the largest error of rounding it to bf16."""
    exponent = torch.tensor(value).log2().floor().item()
    return torch.finfo(torch.bfloat16).eps * 2**exponent / 2


def format_report(result: dict) -> str:
    marks = result["marks"]
    lines = [
        "# Round-off inside the subspace without anchors (`make bench-snapshot-drift`)",
        "",
        f"SmolLM2-135M-Instruct's weights and its default bases (`{result['cache']}`), fp32; {result['steps']} steps "
        f"moving every element by ±{LEARNING_RATE:g} (random signs, the same for every storage); "
        f"{result['machine']}, {result['seconds']:.0f} s. The largest `|(M_t − M₀) U|` after t steps, the leak into "
        "the protected subspace; for scale, half a bf16 ulp of the largest weight, the rounding a bf16 forward "
        "pass applies to these weights anyway:",
        "",
    ]
    for name, row in result["weights"].items():
        lines += [
            f"**{name}** ({row['shape'][0]}×{row['shape'][1]}, k = {row['rank']}; largest weight "
            f"{row['largest_weight']:.3g}, half a bf16 ulp {row['bf16_half_ulp']:.2g}; moved by up to "
            f"{row['moved']:.3g}):",
            "",
            "| storage | " + " | ".join(f"t = {mark}" for mark in marks) + " |",
            "|---" * (len(marks) + 1) + "|",
            *[
                f"| {storage} | " + " | ".join(f"{leaks[str(mark)]:.2g}" for mark in marks) + " |"
                for storage, leaks in row["leaks"].items()
            ],
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--cache", default=CACHE)
    parser.add_argument("--model-dir", default=SMOLLM2_DIR)
    parser.add_argument("--output-dir", default="docs/results")
    options = parser.parse_args(argv)
    require_cache(options.cache)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(materialise_smollm2(options.model_dir))
    subspace, _ = load_subspace(options.cache)
    marks = sorted({mark for mark in (1, 10, 100, 1000) if mark <= options.steps} | {options.steps})
    modules = dict(model.named_modules())
    weights = {}
    for name in WEIGHTS:
        weight = modules[name].weight.detach().float()
        basis = subspace.basis_for(name)
        leaks = {
            storage: leak_over_steps(weight, basis, settings, options.steps, marks)
            for storage, settings in tqdm(STORAGES.items(), desc=name)
        }
        largest = weight.abs().max().item()
        weights[name] = {
            "shape": list(weight.shape),
            "rank": basis.shape[1],
            "largest_weight": largest,
            "bf16_half_ulp": bf16_half_ulp(largest),
            "moved": leaks["anchors, U"]["moved"],
            "leaks": {
                storage: {str(step): value for step, value in run["leak"].items()} for storage, run in leaks.items()
            },
        }
    result = {
        "machine": machine_name("cpu"),
        "seconds": time.perf_counter() - started,
        "cache": options.cache,
        "steps": options.steps,
        "marks": marks,
        "weights": weights,
    }
    write_results(result, os.path.join(options.output_dir, "snapshot_drift_cpu"), format_report)


if __name__ == "__main__":
    main()
