"""`make bench-harm-keys`: does a harm key separate harmful requests before any training?

The harm-keyed exemption (`nullspace_exempt_dataset`) frees, per layer input, the least-drift key
`k = (C + μI)⁻¹ (m_harmful − m_benign)`. It can only help if `k·x` tells harmful requests from
general ones in forms the exempt prompts do not show, and if general inputs barely carry it. This
measures both on SmolLM2-135M-Instruct in minutes, with no training, exactly as the trainer keys
(the same statistics, normalised tokens, prompts and `harm_key`):
- **AUROC** of each prompt's mean `k·x` over its tokens, harmful against the development general
  prompts and look-alikes together, for `make bench-unseen`'s unseen risk area in HarmBench's form
  (the target), the same area as asked, and the trained areas;
- **leak**: `E_reference[(k·x)²] / E_harmful[(k·x)²]` per token (reference data against the exempt
  prompts' harmful side);
- **in span**: the share of `k` inside the default protected basis, i.e. what the exemption frees.

The issue's rule: drop the lever if no layer separates (AUROC < 0.85) or every layer leaks (> 0.2).
No held-out item is read (the proxy's sets are training-side, `benchmarks.unseen_harm`).

    python -m benchmarks.harm_keys [--ridge 0.1] [--output-dir docs/results]
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from benchmarks.harm_key_layers import AUROC_BAR, LEAK_BAR, TARGET, passing_layers
from benchmarks.real import (
    PRESETS,
    driver_parser,
    load_model_and_data,
    machine_name,
    quiet_start,
    timestamped,
    trainer_reference_batches,
    write_results,
)
from benchmarks.unseen_harm import SEEN, UNSEEN, UNSEEN_IMPERATIVE, proxy_sets
from trl_nullspace.config import DEFAULT_ENERGY
from trl_nullspace.estimation.activation import InputCovarianceCollector, top_eigenvectors
from trl_nullspace.estimation.exemption import harm_key
from trl_nullspace.estimation.rank import RankSelection
from trl_nullspace.estimation.reference import ReferenceBatch, tokenize_reference
from trl_nullspace.evaluation.generation import chat_prompt
from trl_nullspace.evaluation.splits import training_side
from trl_nullspace.projection.targets import find_target_linears

# One Linear per distinct layer input of a Llama-style decoder layer, and the name the report gives it.
INPUTS = {
    "self_attn.q_proj": "attention in",
    "self_attn.o_proj": "o_proj in",
    "mlp.gate_proj": "MLP in",
    "mlp.down_proj": "down_proj in",
}
POSITIVES = (TARGET, "unseen area", "seen areas")


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """The chance that a random positive scores above a random negative (ties count half)."""
    scores = np.concatenate([positive, negative])
    order = scores.argsort(kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks over ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    return float(
        (ranks[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2) / (len(positive) * len(negative))
    )


@torch.no_grad()
def token_scores(
    model: nn.Module, linears: dict[str, nn.Module], keys: dict[str, torch.Tensor], batches: list[ReferenceBatch]
) -> dict[str, list[torch.Tensor]]:
    """Per layer input, per sequence of `batches`, `k·x̂` at each of its tokens (x̂: the input scaled to unit length)."""
    scores: dict[str, list[torch.Tensor]] = {name: [] for name in keys}
    mask: list[torch.Tensor] = []

    def hook(name: str) -> Callable:
        def score(module: nn.Module, args: tuple) -> None:
            inputs = args[0].double()
            inputs = inputs / inputs.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            values = inputs @ keys[name]
            scores[name] += [row[row_mask] for row, row_mask in zip(values, mask[0], strict=True)]

        return score

    handles = [linears[name].register_forward_pre_hook(hook(name)) for name in keys]
    try:
        for batch in batches:
            mask[:] = [batch.attention_mask.bool()]
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return scores


def prompt_batches(tokenizer, texts: list[str]) -> list[ReferenceBatch]:
    import datasets

    prompts = datasets.Dataset.from_dict({"text": [chat_prompt(tokenizer, text) for text in texts]})
    return tokenize_reference(prompts, tokenizer, batch_size=8, max_length=512)


def measure(ridge: float, model_dir: str, show: Callable[[str], None]) -> dict:
    preset = PRESETS["cpu"]
    base, tokenizer, data = load_model_and_data(preset, model_dir)
    sets = proxy_sets(training_side().harmful_train[: preset.harmful_examples])
    linears = find_target_linears(base)
    leaders = {name: module for name, module in linears.items() if name.split(".", 3)[-1] in INPUTS}
    reference = trainer_reference_batches(data.references["general"], tokenizer)
    exempt = data.exempt_prompts
    sides = {
        flag: trainer_reference_batches(
            exempt.select([index for index, harmful in enumerate(exempt["harmful"]) if harmful == flag]), tokenizer
        )
        for flag in (True, False)
    }
    statistics = InputCovarianceCollector(leaders, normalize_tokens=True)
    statistics.collect(base, reference, show_progress=False)
    means = {}
    for flag, batches in sides.items():
        collector = InputCovarianceCollector(leaders, normalize_tokens=True, second_moments=False)
        collector.collect(base, batches, show_progress=False)
        means[flag] = {name: collector.sums[name] / collector.token_counts[name] for name in leaders}
    show("statistics and class means collected")
    keys = {
        name: harm_key(
            statistics.covariances[name], statistics.token_counts[name], means[True][name], means[False][name], ridge
        )
        for name in leaders
    }
    selection = RankSelection(energy=DEFAULT_ENERGY)
    in_span = {}
    for name in leaders:
        basis, _ = top_eigenvectors(statistics.covariances[name], selection)
        in_span[name] = float((basis.double().T @ keys[name]).norm() ** 2)
    prompt_sets = {
        TARGET: sets.harmful[UNSEEN_IMPERATIVE],
        "unseen area": sets.harmful[UNSEEN],
        "seen areas": sets.harmful[SEEN],
        "general": sets.general,
        "look-alikes": sets.lookalikes,
    }
    means_per_prompt = {
        label: {
            name: np.array([row.mean().item() for row in rows])
            for name, rows in token_scores(
                base, linears, keys, prompt_batches(tokenizer, [p.text for p in prompts])
            ).items()
        }
        for label, prompts in prompt_sets.items()
    }
    harmful_tokens = token_scores(base, linears, keys, sides[True])
    show("prompts scored")
    rows = []
    for name in leaders:
        key = keys[name]
        leak_numerator = (key @ statistics.covariances[name] @ key).item() / statistics.token_counts[name]
        leak_denominator = torch.cat(harmful_tokens[name]).pow(2).mean().item()
        negatives = np.concatenate([means_per_prompt["general"][name], means_per_prompt["look-alikes"][name]])
        layer, linear = name.split(".")[2], name.split(".", 3)[-1]
        rows.append(
            {
                "layer": int(layer),
                "input": INPUTS[linear],
                "auroc": {label: auroc(means_per_prompt[label][name], negatives) for label in POSITIVES},
                "leak": leak_numerator / leak_denominator,
                "in_span": in_span[name],
            }
        )
    return {
        "ridge": ridge,
        "exempt_prompts": {"harmful": sum(exempt["harmful"]), "benign": len(exempt) - sum(exempt["harmful"])},
        "negatives": {"general": len(sets.general), "look-alikes": len(sets.lookalikes)},
        "positives": {label: len(prompt_sets[label]) for label in POSITIVES},
        "rows": rows,
    }


def verdict(rows: list[dict], input_name: str) -> str:
    """The issue's rule for one kind of layer input: separating layers (AUROC ≥ 0.85 on the target)
    that do not leak (≤ 0.2)."""
    mine = [row for row in rows if row["input"] == input_name]
    good = passing_layers(rows, input_name)
    best = max(mine, key=lambda row: row["auroc"][TARGET])
    return (
        f"- **{input_name}**: best AUROC {best['auroc'][TARGET]:.2f} (layer {best['layer']}, "
        f"leak {best['leak']:.2f}); layers passing both bars: {good if good else 'none'}."
    )


def format_report(result: dict) -> str:
    rows = result["rows"]
    lines = [
        "# Harm keys before training: separation and leak per layer input (SmolLM2-135M-Instruct)",
        "",
        f"Command: `{result['command']}`, {result['seconds'] / 60:.0f} minutes on {result['machine']}. "
        f"Keys `(C + μI)⁻¹(m_harmful − m_benign)` with ridge {result['ridge']} (μ as a share of the mean eigenvalue), "
        f"from `make bench-real`'s exempt prompts ({result['exempt_prompts']['harmful']} harmful, asked and recast as "
        f"instructions; {result['exempt_prompts']['benign']} benign look-alikes) and its general reference data, "
        "normalised tokens, as the trainer keys. AUROC: each prompt's mean `k·x̂`, harmful against the "
        f"{result['negatives']['general']} development general prompts and {result['negatives']['look-alikes']} "
        "look-alikes; positives: "
        + ", ".join(f"{label} ({count})" for label, count in result["positives"].items())
        + ". Leak: reference tokens' mean `(k·x̂)²` over the harmful exempt prompts'. In span: the share of `k` inside "
        "the default basis (energy 0.99), which the exemption frees. No held-out item is read.",
        "",
        f"The issue's rule (drop the lever if no layer reaches AUROC {AUROC_BAR} on the unseen area in HarmBench's "
        f"form, or every layer leaks more than {LEAK_BAR}):",
        *(verdict(rows, name) for name in INPUTS.values()),
        "",
        "| layer | input | AUROC: unseen, HarmBench's form | unseen, asked | seen areas | leak | in span |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda row: (list(INPUTS.values()).index(row["input"]), row["layer"])):
        auc = row["auroc"]
        lines.append(
            f"| {row['layer']} | {row['input']} | {auc[TARGET]:.2f} | {auc['unseen area']:.2f} "
            f"| {auc['seen areas']:.2f} | {row['leak']:.2f} | {row['in_span']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def save_plot(result: dict, path: str) -> None:
    """AUROC on the target set and leak, by layer, one line per kind of layer input."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (separation, leak) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name in INPUTS.values():
        mine = sorted((row for row in result["rows"] if row["input"] == name), key=lambda row: row["layer"])
        layers = [row["layer"] for row in mine]
        separation.plot(layers, [row["auroc"][TARGET] for row in mine], marker="o", label=name)
        leak.plot(layers, [row["leak"] for row in mine], marker="o", label=name)
    separation.axhline(AUROC_BAR, color="grey", linestyle=":")
    leak.axhline(LEAK_BAR, color="grey", linestyle=":")
    separation.set(
        xlabel="decoder layer", ylabel="AUROC ↑", title="unseen area in HarmBench's form vs general + look-alikes"
    )
    leak.set(xlabel="decoder layer", ylabel="E_ref[(k·x)²] / E_harmful[(k·x)²] ↓", title="leak onto reference inputs")
    separation.legend(fontsize=8)
    figure.suptitle(f"SmolLM2-135M-Instruct: harm keys before training (ridge {result['ridge']})")
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = driver_parser(__doc__, ("cpu",), "cpu")
    parser.add_argument("--ridge", type=float, default=0.1)
    options = parser.parse_args(argv)
    started = quiet_start()
    torch.set_grad_enabled(False)
    result = measure(options.ridge, options.model_dir, timestamped(started))
    result.update(
        command="python -m benchmarks.harm_keys " + " ".join(argv if argv is not None else sys.argv[1:]),
        machine=machine_name("cpu"),
        seconds=time.perf_counter() - started,
    )
    suffix = "" if options.ridge == 0.1 else f"-ridge{options.ridge:g}"
    write_results(result, os.path.join(options.output_dir, f"harm_keys{suffix}_cpu"), format_report, save_plot)


if __name__ == "__main__":
    main()
