"""`make bench-memory`: what the constraint keeps per rank, for real model shapes, from real spectra.

The bases' and anchors' sizes follow from each layer's input size `d`, output size and the rank `k`
the rank rule keeps, so no 7B or 70B weights are needed: the rank *fractions* `k / d` come from a
real pretrained model's activation spectra, measured by the null-space trainer's own estimate on
SmolLM2-135M-Instruct with the default settings (a cache written by
`recipes/configs/smollm2-135m_sft.yaml`, or estimated here), per kind of layer input (attention
input, `o_proj` input, MLP input, `down_proj` input). Applied to other shapes they are an
assumption, stated in the output: larger models' spectra may be more or less concentrated.

Per rank, in fp32 (the trainer's default; `nullspace_projection_dtype` does not change storage):
- bases: `Σ_inputs d · k` × 4 bytes, one per distinct input, on every rank under every backend;
- anchors (`update`/`both` targets): `Σ_weights d_out · k` × 4 bytes, whole under DDP and ZeRO-1/2,
  split over the ranks under ZeRO-3 and FSDP2;
- compared with the rank's share of training memory, bf16 weights + fp32 master + Adam's two fp32
  moments = 14 bytes per parameter, divided by the world size under ZeRO-3 and FSDP2 (the scale
  issue's target: the constraint at most 10% of it).

    python -m benchmarks.memory [--cache FILE] [--world 8] [--output-dir docs/results]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import asdict, dataclass

from trl_nullspace.cache import load_subspace

CACHE = os.path.join("outputs", "recipes", "smollm2-135m_subspace.safetensors")
FP32 = 4
TRAINING_BYTES_PER_PARAMETER = 14  # bf16 weights 2 + fp32 master 4 + Adam moments 8
KINDS = {
    "attention input": "q_proj",
    "o_proj input": "o_proj",
    "MLP input": "gate_proj",
    "down_proj input": "down_proj",
}


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    experts: int = 0  # mixture of experts: `intermediate` is each expert's
    tied_embeddings: bool = False

    def parameters(self) -> int:
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate * max(self.experts, 1) + self.hidden * self.experts
        return self.layers * (attention + mlp) + (1 if self.tied_embeddings else 2) * self.vocab * self.hidden

    def inputs(self) -> list[tuple[str, int, list[int]]]:
        """Per layer: (kind, input size, output sizes of the weights reading it), one entry per expert."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = [("attention input", self.hidden, [q, kv, kv]), ("o_proj input", q, [self.hidden])]
        for _ in range(max(self.experts, 1)):
            per_layer += [
                ("MLP input", self.hidden, [self.intermediate, self.intermediate]),
                ("down_proj input", self.intermediate, [self.hidden]),
            ]
        if self.experts:
            per_layer.append(("MLP input", self.hidden, [self.experts]))  # the router
        return per_layer * self.layers


SHAPES = [
    Shape("Qwen2.5-0.5B", 896, 4864, 24, 14, 2, 64, 151936, tied_embeddings=True),
    Shape("Qwen2.5-7B", 3584, 18944, 28, 28, 4, 128, 152064),
    Shape("Llama-3-70B", 8192, 28672, 80, 64, 8, 128, 128256),
    Shape("Qwen3-30B-A3B (MoE)", 2048, 768, 48, 32, 4, 128, 151936, experts=128),
]


def rank_fractions(cache: str) -> dict[str, dict[str, float]]:
    """Mean and largest `k / d` per kind of layer input, from a cached subspace."""
    subspace, _ = load_subspace(cache)
    fractions: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for key, basis in subspace.bases.items():
        for kind, suffix in KINDS.items():
            if key.endswith(suffix):
                fractions[kind].append(basis.shape[1] / basis.shape[0])
    return {kind: {"mean": statistics.mean(values), "max": max(values)} for kind, values in fractions.items()}


def per_rank_bytes(shape: Shape, fractions: dict[str, dict[str, float]], world: int) -> dict[str, float]:
    bases = anchors = 0.0
    for kind, size, outputs in shape.inputs():
        rank = fractions[kind]["mean"] * size
        bases += size * rank * FP32
        anchors += sum(outputs) * rank * FP32
    training = shape.parameters() * TRAINING_BYTES_PER_PARAMETER
    rows = {
        "parameters_billions": shape.parameters() / 1e9,
        "bases_gib": bases / 2**30,
        "anchors_gib": anchors / 2**30,
    }
    for backend, sharded in (("DDP / ZeRO-1/2", False), ("ZeRO-3 / FSDP2", True)):
        constraint = bases + anchors / (world if sharded else 1)
        share = training / (world if sharded else 1)
        rows[f"{backend}: constraint GiB"] = constraint / 2**30
        rows[f"{backend}: share of training memory"] = constraint / share
    return rows


def report(fractions: dict, table: dict, world: int, cache: str) -> str:
    lines = [
        "# What the constraint keeps per rank (`make bench-memory`)",
        "",
        f"Rank fractions `k / d` measured on SmolLM2-135M-Instruct with the default settings (`{cache}`), "
        "applied to each shape's layer inputs (an assumption for other models; experts take the dense MLP's "
        f"fractions). fp32 bases and anchors; training memory = 14 bytes per parameter; {world} ranks.",
        "",
        "| layer input | mean k/d | largest k/d |",
        "|---|---|---|",
        *[f"| {kind} | {value['mean']:.2f} | {value['max']:.2f} |" for kind, value in fractions.items()],
        "",
    ]
    columns = list(next(iter(table.values())))
    lines += ["| shape | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in table.items():
        cells = [f"{row[column]:.0%}" if "share" in column else f"{row[column]:.2f}" for column in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Formula, per rank: bases `4·Σ_inputs d·k` bytes (every rank, every backend) + anchors "
        "`4·Σ_weights d_out·k` bytes (divided by the world size under ZeRO-3 and FSDP2). The scale issue's "
        "target is at most 10% of a rank's training memory under ZeRO-3 on 8 ranks.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=CACHE, help="a subspace cache of SmolLM2 at the default settings")
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--output-dir", default="docs/results")
    options = parser.parse_args(argv)
    if not os.path.exists(options.cache):
        raise FileNotFoundError(
            f"No subspace cache at {options.cache}: write it with `trl-nullspace prepare smollm2 --output-dir "
            "data/smollm2` and `python recipes/sft.py --config recipes/configs/smollm2-135m_sft.yaml` "
            "(or `trl-nullspace estimate`), or pass --cache."
        )
    fractions = rank_fractions(options.cache)
    table = {shape.name: per_rank_bytes(shape, fractions, options.world) for shape in SHAPES}
    text = report(fractions, table, options.world, options.cache)
    os.makedirs(options.output_dir, exist_ok=True)
    with open(os.path.join(options.output_dir, "memory.json"), "w") as handle:
        json.dump(
            {
                "cache": options.cache,
                "world": options.world,
                "fractions": fractions,
                "shapes": [asdict(s) for s in SHAPES],
                "per_rank": table,
            },
            handle,
            indent=1,
        )
    with open(os.path.join(options.output_dir, "memory.md"), "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
