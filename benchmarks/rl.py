"""`make bench-rl`: safety reinforcement learning on a real model, plain TRL against the null-space trainers.

NSPO's setting: a safety reward, GRPO (or RLOO), and the policy gradient kept out of the general
tasks' subspace. SmolLM2-135M-Instruct (`make real-model`) is trained on a prompt mix of harmful
requests (Do-Not-Answer training split) and benign look-alikes (this project's training split),
labelled by a `harmful` column, with `trl_nullspace.rewards.refusal_reward`: +1 for refusing a
harmful request or answering a benign one, −1 otherwise, so over-refusal is penalised rather than
learned. Every row gets the same prompts, steps, generations, sampling temperature, completion
length and `beta`; they were chosen so that plain TRL GRPO learns within the CPU budget (the base
model's sampled answers refuse a harmful request about one time in ten at temperature 0.7, enough
for groups of eight to disagree) and then frozen. Evaluation: `make bench-real`'s held-out sets and
metrics, nothing tuned on them.

Rows: plain GRPO and `NullSpaceGRPOTrainer`; plain RLOO and `NullSpaceRLOOTrainer`; SFT→GRPO, the
SFT stage of `make bench-real` (boundary set, its learning rates) followed by the same GRPO stage,
plain after plain and null-space after null-space (the null-space GRPO stage protects the SFT
model's own reference outputs, as `make bench-real`'s DPO stage does).

    python -m benchmarks.rl [--preset cpu|quick|gpu] [--seeds 0 1 2] [--output-dir docs/results]
    python -m benchmarks.rl --tune [--preset cpu|gpu]   # re-choose the null-space learning rate
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from transformers import PreTrainedModel
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from benchmarks.real import (
    LEARNING_RATES_FILE,
    Preset,
    aggregate,
    driver_parser,
    gain_and_drift_checks,
    held_out_description,
    held_out_reference,
    load_learning_rates,
    load_model_and_data,
    machine_name,
    method_named,
    quiet_start,
    results_table,
    save_plot,
    timestamped,
    train,
    tuning_metrics,
    write_results,
)
from trl_nullspace import NullSpaceGRPOConfig, NullSpaceGRPOTrainer, NullSpaceRLOOConfig, NullSpaceRLOOTrainer
from trl_nullspace.evaluation.evaluate import BaseReference, EvaluationSettings, describe, evaluate_model
from trl_nullspace.evaluation.splits import development_sets
from trl_nullspace.evaluation.training_data import RealData
from trl_nullspace.rewards import refusal_reward
from trl_nullspace.training.progress import quiet_progress

RL_LEARNING_RATES_FILE = os.path.join(os.path.dirname(__file__), "rl_learning_rates.json")
PLAIN_LEARNING_RATE = 2e-5  # plain GRPO learns at it within the budget (development refusal 15% → 53%)
NULL_SPACE_LEARNING_RATES = (1.5e-4, 3e-4, 6e-4)  # the tuning grid, tried in order
ALGORITHMS = {
    "grpo": (GRPOTrainer, GRPOConfig, NullSpaceGRPOTrainer, NullSpaceGRPOConfig),
    "rloo": (RLOOTrainer, RLOOConfig, NullSpaceRLOOTrainer, NullSpaceRLOOConfig),
}
ROWS = (("grpo", False), ("grpo", True), ("rloo", False), ("rloo", True), ("sft→grpo", False), ("sft→grpo", True))


@dataclass(frozen=True)
class RLPreset:
    """The RL budget, the same for every row (`sft` is `make bench-real`'s preset, for SFT→GRPO)."""

    steps: int = 30
    prompts_per_step: int = 4
    generations: int = 8
    completion_tokens: int = 16  # `refusal_reward` reads the opening only
    temperature: float = 0.7
    beta: float = 0.0  # no KL penalty to a reference model, for GRPO and RLOO alike
    evaluation_size: int | None = None  # None: every held-out item
    rows: tuple[tuple[str, bool], ...] = ROWS
    sft: Preset = Preset()
    device: str = "cpu"


PRESETS = {
    "cpu": RLPreset(),
    "quick": RLPreset(
        steps=2,
        prompts_per_step=2,
        generations=4,
        evaluation_size=16,
        rows=(("grpo", False), ("grpo", True), ("sft→grpo", True)),
        sft=Preset(max_steps=3, batch_size=4, harmful_examples=24),
    ),
    "gpu": RLPreset(sft=Preset(device="cuda"), device="cuda"),
}


def method_name(null_space: bool) -> str:
    return "null-space (default)" if null_space else "plain TRL"


def train_rl(
    algorithm: str,
    null_space: bool,
    model: PreTrainedModel,
    tokenizer,
    data: RealData,
    learning_rate: float,
    preset: RLPreset,
    seed: int,
    workdir: str,
    cache_path: str,
) -> PreTrainedModel:
    """One GRPO or RLOO stage on a copy of `model` with the refusal reward and the preset's budget;
    the null-space trainer reads or writes the subspace of `model` at `cache_path`."""
    model = copy.deepcopy(model)
    plain_trainer, plain_config, null_space_trainer, null_space_config = ALGORITHMS[algorithm]
    arguments = dict(
        output_dir=os.path.join(workdir, "run"),
        per_device_train_batch_size=preset.prompts_per_step * preset.generations,
        num_generations=preset.generations,
        max_completion_length=preset.completion_tokens,
        temperature=preset.temperature,
        beta=preset.beta,
        max_steps=preset.steps,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=10,
        use_cpu=preset.device == "cpu",
        bf16=False,
        disable_tqdm=True,
        seed=seed,
    )
    extra: dict[str, Any] = {}
    if null_space:
        trainer_class = null_space_trainer
        config = null_space_config(**arguments, nullspace_cache_path=cache_path)
        extra["reference_dataset"] = data.references["general"]
    else:
        trainer_class, config = plain_trainer, plain_config(**arguments)
    trainer = trainer_class(
        model=model,
        reward_funcs=refusal_reward,
        args=config,
        train_dataset=data.rl_prompts,
        processing_class=tokenizer,
        **extra,
    )
    quiet_progress(trainer, bar=False)  # the driver prints one line per row
    trainer.train()
    return trainer.model.eval()


def learning_rate(null_space: bool, rates: dict[str, float]) -> float:
    return rates.get("null-space (default)", NULL_SPACE_LEARNING_RATES[0]) if null_space else PLAIN_LEARNING_RATE


def rates_file(preset_name: str, output_dir: str) -> str:
    """The committed rates for the full presets; a quick preset's own, beside its outputs."""
    return (
        os.path.join(output_dir, "rl_learning_rates_quick.json") if preset_name == "quick" else RL_LEARNING_RATES_FILE
    )


def run_rows(
    preset: RLPreset, base, tokenizer, data, reference, seed: int, workdir: str, show: Callable, rl_rates_file: str
) -> list:
    """Train and evaluate every (pipeline, method) row of the preset for one seed. Rows that start
    from the base model share one estimate of its subspace; a stage after SFT estimates its own."""
    rl_rates = load_learning_rates(rl_rates_file)
    sft_rates = load_learning_rates(LEARNING_RATES_FILE)
    rows = []
    for pipeline, null_space in preset.rows:
        name = method_name(null_space)
        rate = learning_rate(null_space, rl_rates)
        started = time.perf_counter()
        start_model, cache = base, os.path.join(workdir, "subspace-base.safetensors")
        if pipeline == "sft→grpo":
            cache = os.path.join(workdir, f"subspace-sft-{seed}.safetensors")
            sft_method = method_named(name)
            sft_rate = sft_rates.get(name, sft_method.learning_rates[0])
            start_model = train(sft_method, base, tokenizer, data, "sft", sft_rate, preset.sft, seed, workdir)
        algorithm = pipeline.split("→")[-1]
        model = train_rl(algorithm, null_space, start_model, tokenizer, data, rate, preset, seed, workdir, cache)
        seconds = time.perf_counter() - started
        evaluation = evaluate_model(model, tokenizer, reference)
        rows.append(
            {
                "pipeline": pipeline,
                "method": name,
                "seed": seed,
                "learning_rate": rate,
                "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "train_seconds": seconds,
                "evaluation": evaluation,
            }
        )
        show(
            f"{pipeline:>9} | {name:<22} lr {rate:<7g} refusal {evaluation['refusal']['all']:.1%} over-refusal "
            f"{evaluation['over_refusal']['look-alikes']['all']:.1%} KL {evaluation['drift']['kl_general']:.4f} "
            f"({seconds:.0f} s)"
        )
    return rows


def tune(preset: RLPreset, base, tokenizer, data: RealData, seed: int, workdir: str, show: Callable) -> dict:
    """The null-space GRPO learning rate at matched refusal on the development sets: the smallest rate
    of the grid whose development refusal comes within 2.5 points of plain GRPO's."""
    reference = BaseReference.compute(base, tokenizer, development_sets(), EvaluationSettings(show_progress=False))
    trials: dict[str, list[dict]] = {"plain TRL": [], "null-space (default)": []}
    for null_space, rates in ((False, (PLAIN_LEARNING_RATE,)), (True, NULL_SPACE_LEARNING_RATES)):
        for rate in rates:
            cache = os.path.join(workdir, "subspace-base.safetensors")
            model = train_rl("grpo", null_space, base, tokenizer, data, rate, preset, seed, workdir, cache)
            evaluation = evaluate_model(model, tokenizer, reference)
            trial = {"learning_rate": rate, **tuning_metrics(evaluation)}
            trials[method_name(null_space)].append(trial)
            show(f"tune {method_name(null_space)} lr={rate:g}: " + ", ".join(f"{k}={v:.4g}" for k, v in trial.items()))
            if null_space and trial["refusal"] >= trials["plain TRL"][0]["refusal"] - 0.025:
                break
    target = trials["plain TRL"][0]["refusal"]
    reaching = [run for run in trials["null-space (default)"] if run["refusal"] >= target - 0.025]
    chosen = (reaching[0] if reaching else max(trials["null-space (default)"], key=lambda run: run["refusal"]))[
        "learning_rate"
    ]
    return {
        "target_refusal": target,
        "chosen": {"plain TRL": PLAIN_LEARNING_RATE, "null-space (default)": chosen},
        "trials": trials,
        "development_sets": describe(reference),
        "base_development_refusal": reference.evaluation["refusal"]["all"],
    }


def target_check(summary: list[dict], base: dict) -> list[str]:
    """The RL issue's targets, null-space GRPO against plain GRPO, as measured (may fail)."""
    rows = {entry["method"]: entry for entry in summary if entry["pipeline"] == "grpo"}
    if len(rows) < 2:
        return []
    plain, null_space = rows["plain TRL"], rows["null-space (default)"]
    lines = gain_and_drift_checks(plain, null_space, base, gain_target=0.9)
    title = "over-refusal, look-alikes ↓"
    lines.append(
        f"- {title[:-2]}: {null_space[title][0]:.1%} vs plain {plain[title][0]:.1%} (target: no more than plain's)"
    )
    return lines


def format_report(result: dict) -> str:
    base, settings = result["base_evaluation"], result["settings"]
    lines = [
        f"# Safety RL on a real model: SmolLM2-135M-Instruct (preset `{result['preset']}`)",
        "",
        f"Command: `{result['command']}`, {result['seconds'] / 60:.0f} minutes on {result['machine']}. Seeds: "
        f"{result['seeds']} (mean ± std where more than one). Every RL stage: {settings['steps']} steps of "
        f"{settings['prompts_per_step']} prompts × {settings['generations']} sampled completions (temperature "
        f"{settings['temperature']}, at most {settings['completion_tokens']} tokens), beta {settings['beta']}, AdamW, "
        "constant learning rate; reward `trl_nullspace.rewards.refusal_reward` (+1 for refusing a harmful request "
        "or answering a benign look-alike, −1 otherwise) on Do-Not-Answer training prompts and look-alikes. The "
        f"null-space learning rate matches plain GRPO's development refusal (`benchmarks/rl_learning_rates.json`); "
        f"SFT→GRPO's SFT stage is `make bench-real`'s. Held-out sets as in `make bench-real`: "
        + held_out_description(result["measured"]),
        "",
        *results_table(result),
    ]
    checks = target_check(result["summary"], base)
    if checks:
        lines += ["", "Targets of the RL issue, null-space GRPO against plain GRPO:", *checks]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = driver_parser(__doc__, PRESETS, "cpu")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--tune", action="store_true", help="choose the null-space learning rate and exit")
    options = parser.parse_args(argv)
    preset = PRESETS[options.preset]
    started = quiet_start()
    show = timestamped(started)
    base, tokenizer, data = load_model_and_data(preset.sft, options.model_dir)
    with tempfile.TemporaryDirectory() as workdir:
        if options.tune:
            tuning = tune(preset, base, tokenizer, data, options.seeds[0], workdir, show)
            tuning.update(preset=options.preset, seconds=time.perf_counter() - started)
            path = rates_file(options.preset, options.output_dir)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as handle:
                json.dump(tuning, handle, indent=1)
            show(f"wrote {path}: {tuning['chosen']}")
            return
        reference = held_out_reference(base, tokenizer, preset.evaluation_size)
        show("base model evaluated")
        rows = []
        rates = rates_file(options.preset, options.output_dir)
        for seed in options.seeds:
            rows += run_rows(preset, base, tokenizer, data, reference, seed, workdir, show, rates)
    arguments = argv if argv is not None else sys.argv[1:]
    result = {
        "preset": options.preset,
        "command": "make bench-rl" if not arguments else "python -m benchmarks.rl " + " ".join(arguments),
        "machine": machine_name(preset.device),
        "seconds": time.perf_counter() - started,
        "seeds": options.seeds,
        "settings": asdict(preset),
        "measured": describe(reference),
        "base_evaluation": reference.evaluation,
        "rows": rows,
        "summary": aggregate(rows),
    }
    write_results(result, os.path.join(options.output_dir, f"rl_{options.preset}"), format_report, save_plot)


if __name__ == "__main__":
    main()
