"""`make bench-zero`: the ZeRO-2 `update` projection per optimizer step, inside DeepSpeed's step or after it.

After the step every rank must also correct its whole low-precision module copy (`2·d_out·d·k`
more FLOPs per weight on every rank, and all `d_out × k` coefficients all-reduced); inside the step
(`trl_nullspace.zero_in_step`, the default) each rank projects only its own master fragment and
DeepSpeed's all-gather carries the result. This trains SmolLM2-135M-Instruct with the real-model
recipe's subspace cache (default settings, real ranks) under ZeRO-2 on 2 CPU processes, both ways,
same data and steps, and times on each process the projection's own work per optimizer step
(device-synchronised; the all-reduce included). The two runs must end at the same weights.

    python -m benchmarks.zero_step [--steps 6] [--output-dir docs/results]
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

CONFIG = os.path.join("recipes", "configs", "smollm2-135m_sft.yaml")
DATA = os.path.join("data", "smollm2")
MODES = ("after the step", "inside the step")
WORKER_MODE = "TRL_NULLSPACE_BENCH_ZERO_MODE"
WORKER_OUTPUT = "TRL_NULLSPACE_BENCH_ZERO_OUTPUT"


def _worker() -> None:
    """One process of the 2-process run: the SFT recipe with the projection timed per optimizer step."""
    from trl_nullspace import NullSpaceSFTConfig, NullSpaceSFTTrainer, mixin
    from trl_nullspace.recipe_utils import run_recipe
    from trl_nullspace.zero import ZeroMasterProjector

    if os.environ[WORKER_MODE] == "after the step":
        mixin.supports_in_step_projection = lambda zero_optimizer: False
    pending, per_step = [0.0], []
    project = ZeroMasterProjector.enforce_anchors

    def timed_projection(self):
        started = time.perf_counter()
        removed = project(self)
        float(removed)  # wait for the work (a no-op on the CPU, a synchronisation on an accelerator)
        pending[0] += time.perf_counter() - started
        return removed

    after_step = mixin.NullSpaceTrainerMixin._nullspace_after_optimizer_step

    def step_ends(self):
        after_step(self)
        per_step.append(1e3 * pending[0])
        pending[0] = 0.0

    ZeroMasterProjector.enforce_anchors = timed_projection
    mixin.NullSpaceTrainerMixin._nullspace_after_optimizer_step = step_ends
    started = time.perf_counter()
    run_recipe(NullSpaceSFTTrainer, NullSpaceSFTConfig, sys.argv[1:])
    report = {"projection_ms": per_step, "train_s": time.perf_counter() - started}
    rank = int(os.environ["RANK"])
    with open(os.path.join(os.environ[WORKER_OUTPUT], f"rank{rank}.json"), "w") as handle:
        json.dump(report, handle)


def _accelerate_config(directory: str, port: int) -> str:
    """The shipped ZeRO-2 config on 2 CPU processes, fp32."""
    config = yaml.safe_load(open(os.path.join("recipes", "accelerate", "zero2.yaml")))
    config |= {"num_processes": 2, "use_cpu": True, "mixed_precision": "no", "main_process_port": port}
    path = os.path.join(directory, "zero2_cpu.yaml")
    with open(path, "w") as handle:
        yaml.safe_dump(config, handle)
    return path


def _run(mode: str, directory: str, steps: int, port: int) -> dict:
    settings = yaml.safe_load(open(CONFIG))
    output_dir = os.path.join(directory, mode.replace(" ", "-"))
    settings |= {
        "output_dir": output_dir,
        "max_steps": steps,
        "per_device_train_batch_size": 4,
        "logging_steps": steps,
        "disable_tqdm": True,
    }
    config = os.path.join(directory, f"{mode.replace(' ', '-')}.yaml")
    with open(config, "w") as handle:
        yaml.safe_dump(settings, handle)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", _accelerate_config(directory, port)]
    environment = {**os.environ, WORKER_MODE: mode, WORKER_OUTPUT: directory, "HF_HUB_OFFLINE": "1"}
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
        # The first step also builds DeepSpeed's optimizer state: left out.
        "projection_ms_per_rank": [round(statistics.median(rank["projection_ms"][1:]), 1) for rank in ranks],
        "train_s": round(max(rank["train_s"] for rank in ranks), 1),
        "coefficients_all_reduced": exchanged,
        "coefficients_total": whole,
        "weights": load_file(os.path.join(output_dir, "model.safetensors")),
    }


def format_report(result: dict) -> str:
    rows = result["rows"]
    lines = [
        "# ZeRO-2: the update projection inside DeepSpeed's step or after it (`make bench-zero`)",
        "",
        f"SmolLM2-135M-Instruct, the real-model recipe's subspace cache (default settings), ZeRO-2 on 2 CPU "
        f"processes over gloo ({result['machine']}), {result['steps']} optimizer steps of 8 examples, fp32. "
        "The projection's own work per optimizer step on each process (median over the steps after the first; "
        "its all-reduce included), the coefficients it all-reduces per step, and the whole run's time:",
        "",
        "| projected | rank 0 ms/step | rank 1 ms/step | coefficients all-reduced per step | run s |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        ranks = row["projection_ms_per_rank"]
        lines.append(
            f"| {row['mode']} | {ranks[0]} | {ranks[1]} | {row['coefficients_all_reduced']:,} of "
            f"{row['coefficients_total']:,} | {row['train_s']} |"
        )
    after, inside = (statistics.mean(row["projection_ms_per_rank"]) for row in rows)
    apart = result["weights_apart"]
    lines += [
        "",
        f"Inside the step the projection took {after / inside:.1f}× less time per step, and all-reduced "
        f"{rows[1]['coefficients_all_reduced'] * 4 / 2**20:.1f} MiB instead of "
        f"{rows[0]['coefficients_all_reduced'] * 4 / 2**20:.1f}. The two runs end "
        + ("bit for bit equal" if apart == 0 else f"{apart:.1e} apart (largest weight difference)")
        + ". Inside the step each process projects its own half of the weights; after it, each also corrects its "
        "whole module copy: counted, 4·P·k/world against 4·P·k/world + 2·P·k FLOPs (P·k = Σ d_out·d·k), 2× less "
        "on these 2 processes and 5× less on 8.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--port", type=int, default=29563)
    parser.add_argument("--output-dir", default="docs/results")
    args = parser.parse_args(argv)
    from benchmarks.real import machine_name
    from trl_nullspace.gguf import materialise_smollm2
    from trl_nullspace.prepare import smollm2_sets

    materialise_smollm2()
    if not os.path.isdir(os.path.join(DATA, "reference")):
        smollm2_sets(DATA)
    cache = yaml.safe_load(open(CONFIG))["nullspace_cache_path"]
    if not os.path.exists(cache):
        raise FileNotFoundError(f"{cache} is missing: run `python recipes/sft.py --config {CONFIG}` once to write it.")
    with tempfile.TemporaryDirectory() as directory:
        rows = [_run(mode, directory, args.steps, args.port) for mode in tqdm(MODES, desc="ZeRO-2 runs")]
    first, second = (row.pop("weights") for row in rows)
    result = {
        "machine": machine_name("cpu"),
        "steps": args.steps,
        "rows": rows,
        "weights_apart": max((first[name] - second[name]).abs().max().item() for name in first),
    }
    os.makedirs(args.output_dir, exist_ok=True)
    report = format_report(result)
    with open(os.path.join(args.output_dir, "zero_cpu.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    with open(os.path.join(args.output_dir, "zero_cpu.md"), "w") as handle:
        handle.write(report)
    print(report)


if __name__ == "__main__":
    if WORKER_MODE in os.environ:
        _worker()
    else:
        main()
