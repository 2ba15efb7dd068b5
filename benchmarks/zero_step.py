"""`make bench-zero`: the ZeRO projections per optimizer step, in DeepSpeed's step or around it.

ZeRO-2: around the step, the gradient is projected by a hook in backward (every rank its whole
gradient, at every micro-batch) and the masters after the step (every rank also correcting its whole
low-precision module copy, with all `d_out × k` coefficients all-reduced). Inside the step
(`trl_nullspace.backends.zero.in_step`, the default) each rank projects only its own fragment of the reduced
gradient and of the masters, once per step, and DeepSpeed's all-gather carries the result.
ZeRO-3 (`--stage 3`): the gradient by that hook, or once per step at the start of DeepSpeed's step,
each rank its own partition (`trl_nullspace.backends.zero.step_start`, the default); the masters after the step
either way. This trains SmolLM2-135M-Instruct with the real-model recipe's subspace cache (default
settings, real ranks) on 2 CPU processes, both ways, same data and steps, and times on each process
each projection's own work per optimizer step (the all-reduces included). The two runs must end at
nearly the same weights.

    python -m benchmarks.zero_step [--stage 2] [--steps 6] [--output-dir docs/results]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import yaml
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import TrainerCallback

CONFIG = os.path.join("recipes", "configs", "smollm2-135m_sft.yaml")
DATA = os.path.join("data", "smollm2")
# Per stage: the shipped Accelerate config, and the two ways compared (the old one first).
STAGES = {
    2: ("zero2.yaml", ("around the step", "inside the step")),
    3: ("zero3.yaml", ("hook in backward", "at the step's start")),
}
# Each way as the run's `nullspace_deepspeed_projection`.
PLACEMENT = {
    "around the step": "around_step",
    "inside the step": "in_step",
    "hook in backward": "around_step",
    "at the step's start": "in_step",
}
MICRO_BATCHES = 2
KINDS = ("gradient", "update")
WORKER_OUTPUT = "TRL_NULLSPACE_BENCH_ZERO_OUTPUT"


def _timed(pending: dict[str, float], kind: str, function):
    """`function`, adding its time to `pending[kind]` (CPU processes: no device to wait for)."""

    def run(*args, **kwargs):
        started = time.perf_counter()
        result = function(*args, **kwargs)
        pending[kind] += time.perf_counter() - started
        return result

    return run


class _PerStepTimes(TrainerCallback):
    """Closes each optimizer step's timings: `on_step_end` runs after every callback's
    `on_optimizer_step`, the null-space trainer's update projection included."""

    def __init__(self, pending: dict[str, float], per_step: list[dict[str, float]]):
        self.pending, self.per_step = pending, per_step

    def on_step_end(self, args, state, control, **kwargs):
        self.per_step.append({kind: 1e3 * seconds for kind, seconds in self.pending.items()})
        self.pending.update(gradient=0.0, update=0.0)


def _worker() -> None:
    """One process of the 2-process run: the SFT recipe with both projections timed per optimizer step
    (where they run is the run's own `nullspace_deepspeed_projection`)."""
    from trl_nullspace import NullSpaceSFTConfig, NullSpaceSFTTrainer
    from trl_nullspace.backends.zero.master import ZeroMasterProjector
    from trl_nullspace.projection.constrained import ConstrainedParameter
    from trl_nullspace.recipe_utils import run_recipe

    pending, per_step = {"gradient": 0.0, "update": 0.0}, []
    # The gradient: in DeepSpeed's step, or by the hook in backward at every micro-batch.
    ZeroMasterProjector.project_gradients = _timed(pending, "gradient", ZeroMasterProjector.project_gradients)
    ConstrainedParameter.projected = _timed(pending, "gradient", ConstrainedParameter.projected)
    ZeroMasterProjector.enforce_anchors = _timed(pending, "update", ZeroMasterProjector.enforce_anchors)
    started = time.perf_counter()
    run_recipe(NullSpaceSFTTrainer, NullSpaceSFTConfig, sys.argv[1:], callbacks=[_PerStepTimes(pending, per_step)])
    report = {"per_step_ms": per_step, "train_s": time.perf_counter() - started}
    rank = int(os.environ["RANK"])
    with open(os.path.join(os.environ[WORKER_OUTPUT], f"rank{rank}.json"), "w") as handle:
        json.dump(report, handle)


def _accelerate_config(directory: str, stage: int, port: int) -> str:
    """The shipped ZeRO config of `stage` on 2 CPU processes, fp32."""
    shipped = STAGES[stage][0]
    config = yaml.safe_load(open(os.path.join("recipes", "accelerate", shipped)))
    config |= {"num_processes": 2, "use_cpu": True, "mixed_precision": "no", "main_process_port": port}
    path = os.path.join(directory, f"cpu_{shipped}")
    with open(path, "w") as handle:
        yaml.safe_dump(config, handle)
    return path


def _run(mode: str, directory: str, stage: int, steps: int, port: int) -> dict:
    settings = yaml.safe_load(open(CONFIG))
    output_dir = os.path.join(directory, mode.replace(" ", "-"))
    settings |= {
        "output_dir": output_dir,
        "max_steps": steps,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": MICRO_BATCHES,
        "logging_steps": steps,
        "disable_tqdm": True,
        "nullspace_deepspeed_projection": PLACEMENT[mode],
        # Both ways with the same storage, the anchored whole bases (ZeRO-3's unset options would choose the lean
        # storage for the in-step way only: `storage_choice`): this compares where the projections run.
        "nullspace_basis_storage": "basis",
        "nullspace_shard_bases": False,
        "nullspace_step_snapshot": False,
    }
    config = os.path.join(directory, f"{mode.replace(' ', '-')}.yaml")
    with open(config, "w") as handle:
        yaml.safe_dump(settings, handle)
    accelerate_config = _accelerate_config(directory, stage, port)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config]
    environment = {**os.environ, WORKER_OUTPUT: directory, "HF_HUB_OFFLINE": "1"}
    environment["PYTHONPATH"] = os.getcwd()
    completed = subprocess.run(
        [*launch, "-m", "benchmarks.zero_step", "--config", config], env=environment, capture_output=True, text=True
    )
    if completed.returncode != 0:
        raise RuntimeError(f"The {mode} run failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
    printed = completed.stdout + completed.stderr
    exchanged, whole = map(int, re.search(r"all-reduces (\d+) of (\d+) coefficients", printed).groups())
    ranks = [json.load(open(os.path.join(directory, f"rank{rank}.json"))) for rank in range(2)]
    return {
        "mode": mode,
        # Medians over the steps after the first, which also builds DeepSpeed's optimizer state.
        **{
            f"{kind}_ms_per_rank": [
                round(statistics.median(s[kind] for s in rank["per_step_ms"][1:]), 1) for rank in ranks
            ]
            for kind in KINDS
        },
        "train_s": round(max(rank["train_s"] for rank in ranks), 1),
        "coefficients_all_reduced": exchanged,
        "coefficients_total": whole,
        "weights": load_file(os.path.join(output_dir, "model.safetensors")),
    }


HOW = {
    2: "Around the step: the gradient projected by a hook in backward (each process its whole gradient, every "
    "micro-batch) and the masters after the step (each process also correcting its whole module copy). Inside it: "
    "both once per step, each process its own fragment.",
    3: "Hook in backward: each process projects its whole gradient at every micro-batch. At the step's start: once "
    "per step, each process its own partition of the reduced gradient. The masters are projected after the step "
    "either way, each process its own partition.",
}
COUNTED = {
    2: "the gradient 4·P·k·micro-batches against 4·P·k/world, the update 4·P·k/world + 2·P·k against 4·P·k/world",
    3: "the gradient 4·P·k·micro-batches against 4·P·k/world, the update 4·P·k/world both ways",
}


def format_report(result: dict) -> str:
    rows, stage = result["rows"], result["stage"]
    old, new = rows
    lines = [
        f"# ZeRO-{stage}: the projections in DeepSpeed's step or around it (`make bench-zero`)",
        "",
        f"SmolLM2-135M-Instruct, the real-model recipe's subspace cache (default settings, `both` target), "
        f"ZeRO-{stage} on 2 CPU processes over gloo ({result['machine']}), {result['steps']} optimizer steps of 8 "
        f"examples in {result['micro_batches']} micro-batches, fp32. {HOW[stage]} Each projection's own work per "
        "optimizer step on each process (median over the steps after the first; its all-reduces included), the "
        "update's coefficients all-reduced per step, and the whole run's time:",
        "",
        "| projected | gradient ms/step (rank 0, 1) | update ms/step (rank 0, 1) | update coefficients all-reduced "
        "per step | run s |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        gradient, update = row["gradient_ms_per_rank"], row["update_ms_per_rank"]
        lines.append(
            f"| {row['mode']} | {gradient[0]}, {gradient[1]} | {update[0]}, {update[1]} | "
            f"{row['coefficients_all_reduced']:,} of {row['coefficients_total']:,} | {row['train_s']} |"
        )
    mean = {(row["mode"], kind): statistics.mean(row[f"{kind}_ms_per_rank"]) for row in rows for kind in KINDS}
    gradient_ratio = mean[old["mode"], "gradient"] / mean[new["mode"], "gradient"]
    update_ratio = mean[old["mode"], "update"] / mean[new["mode"], "update"]
    all_reduced = [row["coefficients_all_reduced"] * 4 / 2**20 for row in (new, old)]
    lines += [
        "",
        f"{new['mode'].capitalize()} the gradient projection took {gradient_ratio:.1f}× less time per step than "
        f"{old['mode']}, the update projection {update_ratio:.1f}× less, and the update all-reduced "
        f"{all_reduced[0]:.1f} MiB of coefficients per step instead of {all_reduced[1]:.1f}. Counted "
        f"(P·k = Σ d_out·d·k): {COUNTED[stage]}. The two runs end {result['weights_apart']:.1e} apart (largest "
        "weight difference): the gradient is projected once, summed, instead of per micro-batch, and clipped by the "
        "same rule.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, choices=sorted(STAGES), default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--port", type=int, default=29563)
    parser.add_argument("--output-dir", default="docs/results")
    args = parser.parse_args(argv)
    from benchmarks.real import machine_name, write_results
    from trl_nullspace.data.gguf import materialise_smollm2
    from trl_nullspace.data.prepare import smollm2_sets

    materialise_smollm2()
    if not os.path.isdir(os.path.join(DATA, "reference")):
        smollm2_sets(DATA)
    cache = yaml.safe_load(open(CONFIG))["nullspace_cache_path"]
    if not os.path.exists(cache):
        raise FileNotFoundError(f"{cache} is missing: run `python recipes/sft.py --config {CONFIG}` once to write it.")
    with tempfile.TemporaryDirectory() as directory:
        modes = STAGES[args.stage][1]
        rows = [
            _run(mode, directory, args.stage, args.steps, args.port)
            for mode in tqdm(modes, desc=f"ZeRO-{args.stage} runs")
        ]
    first, second = (row.pop("weights") for row in rows)
    result = {
        "machine": machine_name("cpu"),
        "stage": args.stage,
        "steps": args.steps,
        "micro_batches": MICRO_BATCHES,
        "rows": rows,
        "weights_apart": max((first[name] - second[name]).abs().max().item() for name in first),
    }
    name = "zero_cpu" if args.stage == 2 else f"zero{args.stage}_cpu"
    write_results(result, os.path.join(args.output_dir, name), format_report)


if __name__ == "__main__":
    if WORKER_OUTPUT in os.environ:
        _worker()
    else:
        main()
