"""`make bench-speed`: optimizer-step time and peak memory, null-space SFT vs plain TRL SFT.

Both trainers run in this one process on copies of the same random-init Qwen2-shaped model and the
same random-token batches. They alternate (plain, null-space, plain, ...) for several rounds; each
round's first steps are warm-up and dropped, and the medians of the rest are compared. The subspace
is estimated for real (activation method, update target) from random-token reference data with its
rank capped at a fraction of each layer's input size, and its estimation time and cache size are
reported. Next to each measured ratio stands the floor that FLOPs imply: the projection's matrix
products against the step's 6·tokens·(matmul parameters). Because step-to-step noise can exceed the
projection's cost, the trainer's own per-step work is also timed directly (`OwnWorkTimer`).

    python -m benchmarks.speed --preset cpu    # minutes, any machine
    python -m benchmarks.speed --preset gpu    # a few hundred million parameters, 8k-32k tokens/step
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import datasets
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, TrainerCallback
from trl import SFTConfig, SFTTrainer

from trl_nullspace import NullSpaceSFTConfig, NullSpaceSFTTrainer
from trl_nullspace.data.toy import build_char_tokenizer


@dataclass(frozen=True)
class ModelSize:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000


PRESETS = {
    "cpu": {
        "sizes": [ModelSize("h256-l4", 256, 1024, 4, 4, 2, vocab=4096)],
        "sequence_lengths": [256, 2048],
        "batch_size": 4,
        "rank_fractions": [0.25, 0.5],
        "projection_dtypes": ["float32"],
        "basis_storages": ["basis"],
        "steps": 4,
        "warmup": 1,
        "rounds": 2,
        "estimation_samples": 0,  # eigh of 4864² in fp64 takes minutes on 2 cores: GPU preset only
        "estimation_length": 0,
    },
    "gpu": {
        "sizes": [ModelSize("h1024-l16", 1024, 4096, 16, 16, 4), ModelSize("h1536-l16", 1536, 6144, 16, 16, 4)],
        "sequence_lengths": [1024, 4096],
        "batch_size": 8,
        "rank_fractions": [0.25, 0.5],
        "projection_dtypes": ["float32", "bfloat16"],
        "basis_storages": ["basis"],
        "steps": 6,
        "warmup": 2,
        "rounds": 2,
        "estimation_samples": 512,
        "estimation_length": 512,
    },
}


RUNS = ("plain", "plain_same_parameters", "nullspace")


def synchronize(device: torch.device) -> None:
    """Wait for the accelerator's queued work, so wall-clock times cover it (nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (device-synchronised) and the peak memory of the run."""

    def __init__(self, device: torch.device):
        self.device = device
        self.durations: list[float] = []
        self.peak_bytes = 0
        self._start = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.durations = []
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def on_step_begin(self, args, state, control, **kwargs):
        synchronize(self.device)
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize(self.device)
        self.durations.append(time.perf_counter() - self._start)

    def on_train_end(self, args, state, control, **kwargs):
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)


class OwnWorkTimer:
    """Device-synchronised time of the null-space trainer's own work in each optimizer step.

    That work is the gradient check after backward and the projection after `optimizer.step()`.
    End-to-end step ratios cannot resolve a few percent where consecutive steps differ by more, so
    this measures it directly, in a separate round (the synchronisation it needs would perturb
    the end-to-end timings), and divides by the plain step time.
    """

    HOOKS = ("before_step", "after_step")  # the moments of the trainer's `nullspace_backend`

    def __init__(self, trainer: NullSpaceSFTTrainer, device: torch.device):
        self.trainer = trainer
        self.device = device
        self.calls: dict[str, list[float]] = {name: [] for name in self.HOOKS}

    def _timed(self, name: str, method):
        def run(*args, **kwargs):
            synchronize(self.device)
            started = time.perf_counter()
            result = method(*args, **kwargs)
            synchronize(self.device)
            self.calls[name].append(1e3 * (time.perf_counter() - started))
            return result

        return run

    def per_step_ms(self) -> list[float]:
        """Train once with both hooks timed; the summed time of each optimizer step, in ms."""
        backend = self.trainer.nullspace_backend
        for name in self.HOOKS:
            setattr(backend, name, self._timed(name, getattr(backend, name)))
        try:
            self.trainer.train()
        finally:
            for name in self.HOOKS:
                delattr(backend, name)  # back to the class's methods
        return [sum(values) for values in zip(*self.calls.values(), strict=True)]


def build_model(size: ModelSize, device: torch.device) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to(device)


def random_tokens(rows: int, length: int, vocab: int, seed: int) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, length), generator=generator)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()})


def random_text(rows: int, length: int, seed: int) -> datasets.Dataset:
    """Reference data for the estimator: random digit strings, as many characters as tokens asked for."""
    generator = torch.Generator().manual_seed(seed)
    digits = torch.randint(0, 10, (rows, length), generator=generator)
    return datasets.Dataset.from_dict({"text": ["".join(map(str, row.tolist())) for row in digits]})


def matmul_parameters(model: torch.nn.Module) -> int:
    return sum(module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Linear))


def projection_flops(trainer: NullSpaceSFTTrainer) -> int:
    """Per optimizer step: two products of 2·rows·columns·k' each (k' the stored columns: k, or d − k
    for a complement), once for the update projection and once more for the gradient projection of
    the default `both` target. (The speed_h100-* files were written when this counted the update
    projection only.)"""
    passes = 2 if trainer.args.nullspace_projection_target == "both" else 1
    return sum(
        passes * 4 * rows * columns * item.shared.stored_columns
        for item in trainer.nullspace_projector.constrained
        for rows, columns in [item.matrix_shape]
    )


def common_arguments(output_dir: str, sequence_length: int, batch_size: int, steps: int, device: torch.device):
    return dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=1e-5,
        max_length=sequence_length,
        packing=False,
        bf16=device.type == "cuda",
        use_cpu=device.type == "cpu",
        save_strategy="no",
        report_to="none",
        logging_steps=10_000,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def bench_case(
    size: ModelSize,
    sequence_length: int,
    rank_fraction: float,
    projection_dtype: str,
    basis_storage: str,
    preset: dict,
    device: torch.device,
    workdir: str,
) -> dict:
    steps = preset["warmup"] + preset["steps"]
    batch_size = preset["batch_size"]
    tokenizer = build_char_tokenizer()
    base = build_model(size, device)
    train = random_tokens(batch_size * steps, sequence_length, size.vocab, seed=1)
    reference = random_text(64, min(sequence_length, 512), seed=2)
    max_rank = int(rank_fraction * size.hidden)
    cache_path = os.path.join(
        workdir, f"{size.name}-{sequence_length}-{rank_fraction}-{projection_dtype}-{basis_storage}.safetensors"
    )

    common = common_arguments(workdir, sequence_length, batch_size, steps, device)
    timers = {name: StepTimer(device) for name in RUNS}
    plain_models = {name: copy.deepcopy(base) for name in RUNS[:2]}
    synchronize(device)
    started = time.perf_counter()
    null_space = NullSpaceSFTTrainer(
        model=base,
        args=NullSpaceSFTConfig(
            **common,
            nullspace_eigenvalue_threshold=0.0,
            nullspace_max_rank=max_rank,
            nullspace_projection_dtype=projection_dtype,
            nullspace_basis_storage=basis_storage,
            nullspace_reference_batch_size=8,
            nullspace_cache_path=cache_path,
        ),
        train_dataset=train,
        processing_class=tokenizer,
        reference_dataset=reference,
        callbacks=[timers["nullspace"]],
    )
    synchronize(device)
    setup_seconds = time.perf_counter() - started
    # The null-space trainer freezes what it cannot constrain (embeddings, norms, lm_head); the
    # second baseline trains exactly its parameters, so their ratio is the projection's own cost.
    trainable = {name for name, parameter in base.named_parameters() if parameter.requires_grad}
    for name, parameter in plain_models["plain_same_parameters"].named_parameters():
        parameter.requires_grad_(name in trainable)
    trainers = {
        name: SFTTrainer(
            model=model,
            args=SFTConfig(**common),
            train_dataset=train,
            processing_class=tokenizer,
            callbacks=[timers[name]],
        )
        for name, model in plain_models.items()
    }
    trainers["nullspace"] = null_space

    steps_ms = {name: [] for name in RUNS}
    peaks = dict.fromkeys(RUNS, 0)
    for _ in range(preset["rounds"]):
        for name in RUNS:
            trainers[name].train()
            steps_ms[name] += [1e3 * value for value in timers[name].durations[preset["warmup"] :]]
            peaks[name] = max(peaks[name], timers[name].peak_bytes)
    medians = {name: statistics.median(values) for name, values in steps_ms.items()}
    own_work_ms = OwnWorkTimer(null_space, device).per_step_ms()[preset["warmup"] :]
    own_work_median = statistics.median(own_work_ms)

    step_flops = 6 * batch_size * sequence_length * matmul_parameters(base)
    ranks = [item.rank for item in null_space.nullspace_projector.constrained]
    result = {
        "model": size.name,
        "parameters_millions": round(sum(p.numel() for p in base.parameters()) / 1e6, 1),
        "tokens_per_step": batch_size * sequence_length,
        "rank_fraction": rank_fraction,
        "max_rank": max_rank,
        "projection_dtype": projection_dtype,
        "basis_storage": basis_storage,
        "mean_rank": round(sum(ranks) / len(ranks), 1),
        **{f"{name}_step_ms": round(value, 2) for name, value in medians.items()},
        "ratio_vs_plain": round(medians["nullspace"] / medians["plain"], 4),
        "ratio_vs_same_parameters": round(medians["nullspace"] / medians["plain_same_parameters"], 4),
        "flop_floor_ratio": round(1 + projection_flops(null_space) / step_flops, 4),
        "own_work_ms": round(own_work_median, 2),
        "own_work_share": round(own_work_median / medians["plain_same_parameters"], 4),
        **{
            f"{name}_peak_gib": round(peak / 2**30, 3) if device.type == "cuda" else "n/a"
            for name, peak in peaks.items()
        },
        "estimation_and_setup_s": round(setup_seconds, 2),
        "cache_mib": round(os.path.getsize(cache_path) / 2**20, 2),
        "raw_steps_ms": {name: [round(value, 2) for value in values] for name, values in steps_ms.items()},
        "raw_own_work_ms": [round(value, 3) for value in own_work_ms],
    }
    del trainers, null_space, plain_models, base
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def bench_estimation(device: torch.device, num_samples: int, sequence_length: int, workdir: str) -> dict:
    """Activation-subspace estimation of a Qwen2.5-0.5B-shaped model (random init) with default settings."""
    from trl_nullspace.estimation.activation import estimate_activation_subspace
    from trl_nullspace.estimation.rank import RankSelection
    from trl_nullspace.estimation.reference import tokenize_reference
    from trl_nullspace.projection.targets import find_target_linears
    from trl_nullspace.storage.cache import save_subspace

    size = ModelSize("qwen2.5-0.5b-shape", 896, 4864, 24, 14, 2, vocab=151936)
    model = build_model(size, device).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    batches = tokenize_reference(
        random_text(num_samples, sequence_length, seed=3),
        build_char_tokenizer(),
        batch_size=8,
        max_length=sequence_length,
        num_samples=num_samples,
    )
    linears = find_target_linears(model, None)
    synchronize(device)
    started = time.perf_counter()
    subspace = estimate_activation_subspace(model, batches, linears, RankSelection(energy=0.99), False)
    synchronize(device)
    seconds = time.perf_counter() - started
    path = os.path.join(workdir, "estimation.safetensors")
    save_subspace(path, subspace, {"benchmark": "estimation"})
    basis_bytes = sum(basis.numel() * basis.element_size() for basis in subspace.bases.values())
    anchor_bytes = sum(
        module.weight.shape[0] * subspace.basis_for(name).shape[1] * 4 for name, module in linears.items()
    )
    ranks = {key: basis.shape[1] for key, basis in subspace.bases.items()}
    return {
        "model": size.name,
        "parameters_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "reference_tokens": sum(int(batch.attention_mask.sum()) for batch in batches),
        "estimation_s": round(seconds, 2),
        "distinct_inputs": len(ranks),
        "rank_min": min(ranks.values()),
        "rank_max": max(ranks.values()),
        "bases_mib": round(basis_bytes / 2**20, 1),
        "anchors_mib": round(anchor_bytes / 2**20, 1),
        "cache_file_mib": round(os.path.getsize(path) / 2**20, 1),
    }


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}"


TABLE_KEYS = [
    "model",
    "parameters_millions",
    "tokens_per_step",
    "rank",
    "projection_dtype",
    "basis_storage",
    "plain_step_ms",
    "plain_same_parameters_step_ms",
    "nullspace_step_ms",
    "ratio_vs_plain",
    "ratio_vs_same_parameters",
    "flop_floor_ratio",
    "own_work_ms",
    "own_work_share",
    "plain_peak_gib",
    "nullspace_peak_gib",
    "estimation_and_setup_s",
    "cache_mib",
]


def write_report(results: dict, directory: str, tag: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"speed_{tag}.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    lines = [
        f"# Speed: null-space SFT vs plain TRL SFT ({tag})",
        "",
        f"Device: {results['device']}. Command: `{results['command']}`. Medians of "
        f"{results['preset']['rounds']} alternating rounds × {results['preset']['steps']} steps "
        f"(after {results['preset']['warmup']} warm-up steps per round). Raw step times are in `speed_{tag}.json`.",
        "",
        '"Own work" is the null-space trainer\'s per-step gradient check and projection, timed directly '
        "(device-synchronised, in a separate round, median per step); its share is that time over the plain "
        "same-parameters step: the projection's cost where step noise hides it in the end-to-end ratios.",
        "",
        "| model | params (M) | tokens/step | rank (max / mean) | projection dtype | storage | plain ms "
        "| plain, same params ms "
        "| null-space ms | ratio vs plain | ratio vs same params | FLOP floor | own work ms | own work share "
        "| plain peak GiB | null-space peak GiB "
        "| estimation+setup s | cache MiB |",
        "|" + "---|" * len(TABLE_KEYS),
    ]
    for row in results["cases"]:
        columns = [f"{row['max_rank']} / {row['mean_rank']}" if key == "rank" else row[key] for key in TABLE_KEYS]
        lines.append("| " + " | ".join(str(value) for value in columns) + " |")
    if results.get("estimation"):
        estimation = results["estimation"]
        lines += ["", "## Estimating a 0.5B model's subspace", ""]
        lines += [f"- {key}: {value}" for key, value in estimation.items()]
    with open(os.path.join(directory, f"speed_{tag}.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output-dir", default="docs/results")
    parser.add_argument("--tag", default=None, help="suffix of the result files (default: the preset)")
    parser.add_argument("--skip-estimation", action="store_true", help="skip the 0.5B estimation benchmark")
    parser.add_argument("--sizes", nargs="*", help="only these model sizes of the preset, by name")
    parser.add_argument("--sequence-lengths", nargs="*", type=int, help="override the preset's")
    parser.add_argument("--rank-fractions", nargs="*", type=float, help="override the preset's")
    parser.add_argument("--projection-dtypes", nargs="*", help="override the preset's")
    parser.add_argument("--basis-storages", nargs="*", choices=["basis", "smaller"], help="override the preset's")
    parser.add_argument("--rounds", type=int, help="override the preset's number of alternating rounds")
    arguments = parser.parse_args()
    preset = dict(PRESETS[arguments.preset])
    if arguments.sizes:
        preset["sizes"] = [size for size in preset["sizes"] if size.name in arguments.sizes]
    for key in ("sequence_lengths", "rank_fractions", "projection_dtypes", "basis_storages", "rounds"):
        if getattr(arguments, key):
            preset[key] = getattr(arguments, key)
    device = torch.device("cuda" if arguments.preset == "gpu" else "cpu")
    results = {
        "device": device_description(device),
        "command": "python -m benchmarks.speed " + " ".join(sys.argv[1:]),
        "preset": {key: value for key, value in preset.items() if key != "sizes"}
        | {"sizes": [asdict(size) for size in preset["sizes"]]},
        "cases": [],
    }
    tag = arguments.tag or arguments.preset
    with tempfile.TemporaryDirectory() as workdir:
        for size in preset["sizes"]:
            for sequence_length in preset["sequence_lengths"]:
                for rank_fraction in preset["rank_fractions"]:
                    for dtype in preset["projection_dtypes"]:
                        for storage in preset["basis_storages"]:
                            row = bench_case(
                                size, sequence_length, rank_fraction, dtype, storage, preset, device, workdir
                            )
                            print(json.dumps({k: v for k, v in row.items() if not k.startswith("raw_")}), flush=True)
                            results["cases"].append(row)
                            write_report(results, arguments.output_dir, tag)  # a later failure keeps these
        if preset["estimation_samples"] and not arguments.skip_estimation:
            results["estimation"] = bench_estimation(
                device, preset["estimation_samples"], preset["estimation_length"], workdir
            )
            print(json.dumps(results["estimation"]), flush=True)
    write_report(results, arguments.output_dir, tag)


if __name__ == "__main__":
    main()
