"""`make bench-memory`: what the constraint keeps per rank, for real model shapes, from real spectra.

The bases' and anchors' sizes follow from each layer's input size `d`, output size and the rank `k`
the rank rule keeps, so no 7B or 70B weights are needed: the rank *fractions* `k / d` come from a
real pretrained model's activation spectra, measured by the null-space trainer's own estimate on
SmolLM2-135M-Instruct with the default settings (a cache written by
`recipes/configs/smollm2-135m_sft.yaml`, or estimated here), per kind of layer input (attention
input, `o_proj` input, MLP input, `down_proj` input). Applied to other shapes they are an
assumption, stated in the output: larger models' spectra may be more or less concentrated.

What the code allocates per rank, in fp32 (the trainer's default; `nullspace_projection_dtype`
does not change storage), counted from the shapes, not measured on an accelerator:
- bases `Σ_inputs d·k`, whole on every rank under every backend (one basis per distinct input,
  shared by the weights that read it) except ZeRO-1/2, whose ranks keep only the bases of the weights
  their contiguous flat range reaches (the largest such set is counted), and anchors `Σ_weights d_out·k`,
  whole under DDP, each rank's rows only under ZeRO and FSDP2 (ZeRO-1/2 project inside DeepSpeed's step, each rank
  its own master fragment);
- while projecting: DDP and FSDP2 one weight's residual at a time (its local rows × k); ZeRO every
  weight's local rows of coefficients at once (the anchors / world); under ZeRO-3 also an fp32 copy
  of one weight's gradient partition at a time (DeepSpeed accumulates bf16 gradients by default;
  the default `both` target projects them at the start of DeepSpeed's step, `backends.zero.step_start`);
- with `nullspace_offload`: bases and anchors in host memory instead, and on the accelerator one
  staged block at a time: the basis block (d × k_b, at most the block size), its anchor rows and
  residual (2 · local rows × k_b); under ZeRO also the buffer of rows that partition boundaries
  cut (ZeRO-3: at most world − 1 rows per weight, exchanged in runs of at most one block, two runs
  held at once; ZeRO-1/2: at most world − 1 in all) and, under ZeRO-3, that gradient copy. Over
  PCIe per optimizer step: the bases twice under the default `both` target (gradient, then update,
  each once per step whatever the accumulation) and the local anchor rows once;
- under FSDP2 with `nullspace_shard_bases`: each rank's rows of every basis, one basis (or one block
  of a larger one) whole in flight, and every basis received twice per step, against FSDP2's own
  traffic; with `nullspace_step_snapshot` no anchors or weights as last projected between steps, and
  a copy of each rank's rows during the step; with `nullspace_complement_dtype: bfloat16` complements
  in 2 bytes (6 in flight); at `--world` and at 64 ranks. Under ZeRO-3 the same split, snapshots and bf16,
  beside the rows partitions cut (exchanged in runs) and one weight's gradient copy; whole-weight ownership,
  the alternative not built. And the scale issue's FLOP criterion.
Training memory per rank: bf16 weights 2 + fp32 master 4 + Adam's moments 8 bytes per parameter,
replicated under DDP, the 12 optimizer bytes partitioned under ZeRO-1/2, all 14 under ZeRO-3/FSDP2
(the scale issue's target: the constraint at most 10% of it under ZeRO-3 on 8 ranks).

    python -m benchmarks.memory [--cache FILE] [--world 8] [--block-mib 64] [--output-dir docs/results]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from trl_nullspace.config import NullSpaceArguments
from trl_nullspace.storage.cache import load_subspace

CACHE = os.path.join("outputs", "recipes", "smollm2-135m_subspace.safetensors")
FP32 = 4
FP64 = 8
BF16 = 2
TRAINING_BYTES_PER_PARAMETER = 14  # bf16 weights 2 + fp32 master 4 + Adam moments 8
WEIGHT_BYTES = 2  # the bf16 weights ZeRO-1/2 keep whole on every rank
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


def gathered_at_once(size: int, columns: float, element_bytes: int, block_bytes: int) -> float:
    """Elements of a split basis (size × columns) whole at once: all of it, or one column block of at most
    `block_bytes` where it is larger (`SharedBasis.shard_rows`)."""
    width = max(1, block_bytes // (element_bytes * size))
    return size * min(columns, width)


def zero12_bases_kept(shape: Shape, fractions: dict[str, dict[str, float]], world: int) -> float:
    """The most basis bytes a ZeRO-1/2 rank keeps (`zero.in_step.release_unread_bases`): the constrained weights
    flattened in the model's order (one parameter group: the trainer freezes the rest) and cut into `world`
    equal ranges, each rank keeps the distinct bases of the weights its range reaches."""
    basis_bytes, weights = [], []
    for index, (kind, size, outputs) in enumerate(shape.inputs()):
        basis_bytes.append(size * fractions[kind]["mean"] * size * FP32)
        weights += [(rows * size, index) for rows in outputs]
    total = sum(numel for numel, _ in weights)
    kept: list[set[int]] = [set() for _ in range(world)]
    start = 0
    for numel, index in weights:  # value `e` of the flat group is in rank `e · world // total`'s range
        for rank in range(start * world // total, (start + numel - 1) * world // total + 1):
            kept[rank].add(index)
        start += numel
    return max(sum(basis_bytes[index] for index in indices) for indices in kept)


def per_rank_bytes(
    shape: Shape, fractions: dict[str, dict[str, float]], world: int, block_bytes: int
) -> dict[str, float]:
    """The constraint's bytes per rank under each backend (see the module's docstring), in GiB, and
    their share of that rank's training memory."""
    bases = anchors = cut_rows = largest_cut = largest_weight = longest_row = largest_basis = largest_stored = 0.0
    # `nullspace_step_snapshot`: each rank's rows of every constrained weight, copied for the step only, and
    # while one weight's step is projected its change (and, with a basis, its coefficients).
    snapshot = largest_step_change = 0.0
    smaller_bases_bf16 = largest_stored_bf16 = 0.0
    largest_residual = largest_local_residual = largest_staged = largest_local_gradient = 0.0
    # `nullspace_basis_storage: smaller`: the complement where d − k < k, and instead of its weights'
    # anchors their rows as last projected; per weight, the change and its kept part while projecting.
    smaller_bases = smaller_state = smaller_transient = smaller_staged = previous_traffic = 0.0
    for kind, size, outputs in shape.inputs():
        rank = fractions[kind]["mean"] * size
        block_columns = min(rank, max(1, block_bytes // (FP32 * size)))
        bases += size * rank * FP32
        anchors += sum(outputs) * rank * FP32
        complement = size - rank < rank
        stored = size - rank if complement else rank
        stored_block = min(stored, max(1, block_bytes // (FP32 * size)))
        smaller_bases += size * stored * FP32
        # `nullspace_complement_dtype: bfloat16`: complements in 2 bytes, bases kept as U in 4.
        smaller_bases_bf16 += size * stored * (BF16 if complement else FP32)
        # In flight while split bases are gathered: the whole basis, or one block of at most `block_bytes` (as
        # stored) where it is larger; with bf16 complements the block's bf16 bytes and their fp32 reading.
        largest_basis = max(largest_basis, gathered_at_once(size, rank, FP32, block_bytes) * FP32)
        largest_stored = max(largest_stored, gathered_at_once(size, stored, FP32, block_bytes) * FP32)
        stored_bytes = BF16 if complement else FP32
        in_flight = gathered_at_once(size, stored, stored_bytes, block_bytes) * (stored_bytes + FP32 * complement)
        largest_stored_bf16 = max(largest_stored_bf16, in_flight)
        for rows in outputs:
            local = rows / world
            snapshot += local * size * FP32
            largest_step_change = max(largest_step_change, local * (size + (0 if complement else rank)) * FP32)
            if complement:
                smaller_state += local * size * FP32
                previous_traffic += 2 * local * size * FP32  # to the accelerator and back, offloaded
                smaller_transient = max(smaller_transient, 2 * local * size * FP32)
                smaller_staged = max(smaller_staged, (size * stored_block + 3 * local * size) * FP32)
            else:
                smaller_state += local * rank * FP32
                smaller_transient = max(smaller_transient, local * rank * FP32)
                smaller_staged = max(smaller_staged, (size + 2 * local) * stored_block * FP32)
            largest_residual = max(largest_residual, rows * rank * FP32)
            largest_local_residual = max(largest_local_residual, rows / world * rank * FP32)
            staged = (size + 2 * rows / world) * block_columns * FP32
            largest_staged = max(largest_staged, staged)
            # ZeRO-3 at the start of its step: one weight's bf16 gradient partition read in fp32.
            largest_local_gradient = max(largest_local_gradient, rows / world * size * FP32)
            cut_rows += min(rows, world - 1) * size * FP32  # ZeRO-3: at most one row per boundary per weight
            largest_cut = max(largest_cut, min(rows, world - 1) * size * FP32)
            largest_weight = max(largest_weight, rows * size * FP32)
            longest_row = max(longest_row, size * FP32)
    # ZeRO-3 exchanges the cut rows in runs of whole weights of at most one block (a larger weight alone), each
    # just before its weights are projected: at most two runs held at once (`master.exchange_runs`).
    exchanged_at_once = min(cut_rows, 2 * max(block_bytes, largest_cut))
    parameters = shape.parameters()
    training = {
        "DDP": parameters * TRAINING_BYTES_PER_PARAMETER,
        "ZeRO-1/2": parameters * (WEIGHT_BYTES + (TRAINING_BYTES_PER_PARAMETER - WEIGHT_BYTES) / world),
        "ZeRO-3": parameters * TRAINING_BYTES_PER_PARAMETER / world,
        "FSDP2": parameters * TRAINING_BYTES_PER_PARAMETER / world,
        "ZeRO-1/2 + offload": parameters * (WEIGHT_BYTES + (TRAINING_BYTES_PER_PARAMETER - WEIGHT_BYTES) / world),
        "ZeRO-3 + offload": parameters * TRAINING_BYTES_PER_PARAMETER / world,
        "FSDP2 + offload": parameters * TRAINING_BYTES_PER_PARAMETER / world,
        "FSDP2, smaller": parameters * TRAINING_BYTES_PER_PARAMETER / world,
        "FSDP2, smaller + offload": parameters * TRAINING_BYTES_PER_PARAMETER / world,
        "ZeRO-3, smaller": parameters * TRAINING_BYTES_PER_PARAMETER / world,
        "ZeRO-3, smaller + offload": parameters * TRAINING_BYTES_PER_PARAMETER / world,
        "FSDP2, split bases": parameters * TRAINING_BYTES_PER_PARAMETER / world,
        "FSDP2, smaller + split bases": parameters * TRAINING_BYTES_PER_PARAMETER / world,
        "FSDP2, split bases + step snapshots": parameters * TRAINING_BYTES_PER_PARAMETER / world,
        "FSDP2, smaller + split bases + step snapshots": parameters * TRAINING_BYTES_PER_PARAMETER / world,
        "FSDP2, bf16 smaller + split bases + step snapshots": parameters * TRAINING_BYTES_PER_PARAMETER / world,
        "ZeRO-3, split bases": parameters * TRAINING_BYTES_PER_PARAMETER / world,
        "ZeRO-3, smaller + split bases": parameters * TRAINING_BYTES_PER_PARAMETER / world,
        "ZeRO-3, split bases + step snapshots": parameters * TRAINING_BYTES_PER_PARAMETER / world,
        "ZeRO-3, smaller + split bases + step snapshots": parameters * TRAINING_BYTES_PER_PARAMETER / world,
        "ZeRO-3, bf16 smaller + split bases + step snapshots": parameters * TRAINING_BYTES_PER_PARAMETER / world,
    }
    constraint = {
        "DDP": bases + anchors + largest_residual,
        # Projected inside DeepSpeed's step, each rank its own fragment's rows (`backends.zero.in_step`), the
        # gradient too (no hook in backward), keeping only the bases its fragment reads; ZeRO-3 projects the
        # gradient at its step's start.
        "ZeRO-1/2": zero12_bases_kept(shape, fractions, world) + 2 * anchors / world,
        "ZeRO-3": bases + 2 * anchors / world + largest_local_gradient,
        "FSDP2": bases + anchors / world + largest_local_residual,
        # ZeRO-1/2 cut the flat weights into `world` slices: at most world − 1 cut rows in all; the
        # gradient is projected in the step too (no hook's copies).
        "ZeRO-1/2 + offload": (world - 1) * longest_row + largest_staged,
        "ZeRO-3 + offload": exchanged_at_once + largest_staged + largest_local_gradient,
        "FSDP2 + offload": largest_staged,
        "FSDP2, smaller": smaller_bases + smaller_state + smaller_transient,
        "FSDP2, smaller + offload": smaller_staged,
        # ZeRO-3 with complements exchanges the split rows' values (`RowExchangeZeroProjector`); its
        # gradient projection holds one weight's gradient copy and, with a complement, its kept part.
        "ZeRO-3, smaller": smaller_bases
        + smaller_state
        + max(smaller_transient, largest_local_gradient)
        + exchanged_at_once,
        "ZeRO-3, smaller + offload": max(smaller_staged, largest_local_gradient) + exchanged_at_once,
        # `nullspace_shard_bases`: each rank its rows of every basis, and one basis whole while it is used.
        "FSDP2, split bases": bases / world + largest_basis + anchors / world + largest_local_residual,
        "FSDP2, smaller + split bases": smaller_bases / world + largest_stored + smaller_state + smaller_transient,
        # `nullspace_step_snapshot` too: no anchors or weights as last projected between steps (the snapshot
        # during the step is counted apart, `step snapshot: GiB during the step`).
        "FSDP2, split bases + step snapshots": bases / world + largest_basis + largest_step_change,
        "FSDP2, smaller + split bases + step snapshots": smaller_bases / world + largest_stored + largest_step_change,
        "FSDP2, bf16 smaller + split bases + step snapshots": smaller_bases_bf16 / world
        + largest_stored_bf16
        + largest_step_change,
        # ZeRO-3 with split bases projects as with offload or complements (`RowExchangeZeroProjector`): the split
        # rows' values travel, each rank keeps its anchor rows (or weights as last projected) and the gradient copy.
        "ZeRO-3, split bases": bases / world
        + largest_basis
        + anchors / world
        + largest_local_residual
        + exchanged_at_once
        + largest_local_gradient,
        "ZeRO-3, smaller + split bases": smaller_bases / world
        + largest_stored
        + smaller_state
        + max(smaller_transient, largest_local_gradient)
        + exchanged_at_once,
        # With step snapshots (taken at the start of DeepSpeed's step): no anchors or weights as last projected between
        # steps; one weight's change (and kept part) while it is projected, or the gradient copy before the step.
        "ZeRO-3, split bases + step snapshots": bases / world
        + largest_basis
        + max(largest_step_change, largest_local_gradient)
        + exchanged_at_once,
        "ZeRO-3, smaller + split bases + step snapshots": smaller_bases / world
        + largest_stored
        + max(smaller_transient, largest_step_change, largest_local_gradient)
        + exchanged_at_once,
        "ZeRO-3, bf16 smaller + split bases + step snapshots": smaller_bases_bf16 / world
        + largest_stored_bf16
        + max(smaller_transient, largest_step_change, largest_local_gradient)
        + exchanged_at_once,
    }
    row = {
        "parameters_billions": parameters / 1e9,
        "bases_gib": bases / 2**30,
        "anchors_gib": anchors / 2**30,
    }
    for backend, held in constraint.items():
        row[f"{backend}: GiB"] = held / 2**30
        row[f"{backend}: share"] = held / training[backend]
    row["offload: host GiB"] = (bases + anchors / world) / 2**30
    # One node of `world` processes sharing one host copy of the bases (`nullspace_offload_share_node`).
    row["offload: node host GiB"] = (bases + anchors) / 2**30
    row["smaller + offload: node host GiB"] = (smaller_bases + world * smaller_state) / 2**30
    row["offload: PCIe GiB per step"] = (2 * bases + anchors / world) / 2**30
    row["smaller + offload: host GiB"] = (smaller_bases + smaller_state) / 2**30
    row["smaller + offload: PCIe GiB per step"] = (2 * smaller_bases + smaller_state + previous_traffic) / 2**30
    # Split bases: every basis all-gathered once per projection, twice per step under the `both` target.
    row["split bases: received GiB per step"] = 2 * bases * (world - 1) / world / 2**30
    row["smaller + split bases: received GiB per step"] = 2 * smaller_bases * (world - 1) / world / 2**30
    row["bf16 smaller + split bases: received GiB per step"] = 2 * smaller_bases_bf16 * (world - 1) / world / 2**30
    row[FSDP_OWN] = fsdp_own_traffic(parameters, world) / 2**30
    # The alternative the scale issue names, not built: each weight owned whole by one rank (byte-balanced), as
    # distributed Muon implementations do. Per projection a rank receives the other ranks' rows of the weights it
    # owns (fp32 gradient or change) and, once projected, its rows of everyone else's: twice 4·C/world ·
    # (world − 1)/world for C constrained values, twice per step under `both`; it keeps its owned share of the
    # stored bases and one owned weight whole in flight.
    constrained = sum(size * sum(outputs) for _, size, outputs in shape.inputs())
    row["owned weights: received GiB per step"] = 2 * 2 * FP32 * constrained * (world - 1) / world**2 / 2**30
    row["owned weights, smaller + step snapshots: GiB"] = (smaller_bases / world + largest_weight) / 2**30
    row["owned weights, smaller + step snapshots: share"] = (smaller_bases / world + largest_weight) / training[
        "FSDP2"
    ]
    row["step snapshot: GiB during the step"] = snapshot / 2**30
    row["step snapshot: share during the step"] = snapshot / training["FSDP2"]
    return row


FSDP_MICRO_BATCHES = 8
SPLIT_WORLD = 64  # the split bases' table adds this world size to `--world`'s (the scale issue's two)


def fsdp_own_traffic(parameters: int, world: int, micro_batches: int = FSDP_MICRO_BATCHES) -> float:
    """Bytes a rank receives per optimizer step in FSDP2's own collectives, bf16 throughout: the weights
    all-gathered for the forward and again for the backward (resharded after the forward), and the gradients
    reduce-scattered, at every micro-batch: `3 · 2 · parameters · (world − 1)/world` each."""
    return micro_batches * 3 * WEIGHT_BYTES * parameters * (world - 1) / world


def one_projection_flops(shape: Shape, fractions: dict[str, dict[str, float]], smaller: bool = False) -> float:
    """One projection of every constrained weight (or gradient): 4·d_out·d·k' FLOPs each, k' the stored columns."""
    flops = 0.0
    for kind, size, outputs in shape.inputs():
        rank = fractions[kind]["mean"] * size
        stored = min(rank, size - rank) if smaller else rank
        flops += 4 * sum(outputs) * size * stored
    return flops


def projection_flops_share(shape: Shape, fractions: dict[str, dict[str, float]], tokens: int, smaller: bool) -> float:
    """The default `both` target's projection FLOPs on one device (gradient, then update) over the
    training step's 6·parameters·tokens: the floor of the projection's own share of a step, whatever
    the kernels."""
    return 2 * one_projection_flops(shape, fractions, smaller) / (6 * shape.parameters() * tokens)


ZERO_TOKENS_PER_RANK = 8192
ZERO_FLOP_COLUMNS = [("update", 1), ("once-per-step both", 8), ("hooked both", 1), ("hooked both", 8)]


def zero_flops_share(
    shape: Shape, fractions: dict[str, dict[str, float]], world: int, target: str, micro_batches: int
) -> float:
    """Per rank and optimizer step of `ZERO_TOKENS_PER_RANK` tokens on each rank, sharded over `world`
    ranks: the `update` projection is divided over the ranks (each its own rows). The `both` target's
    gradient projection is too where it runs once per step on each rank's share (ZeRO-1/2 inside
    DeepSpeed's step, ZeRO-3 at its start, FSDP2), but where DeepSpeed's step cannot take it (ZeRO-1/2
    in fp16, `backends.zero.in_step`) a hook projects the whole gradient on every rank at every micro-batch
    (before ZeRO reduces it). As a share of the rank's training FLOPs, 6·parameters·its tokens."""
    one = one_projection_flops(shape, fractions)
    gradient = {"update": 0.0, "once-per-step both": one / world, "hooked both": one * micro_batches}[target]
    flops = one / world + gradient
    return flops / (6 * shape.parameters() * ZERO_TOKENS_PER_RANK)


def sharded_step_flops_share(
    shape: Shape, fractions: dict[str, dict[str, float]], world: int, micro_batches: int, smaller: bool
) -> float:
    """The `both` target once per optimizer step, each rank projecting its 1/world share of every weight (FSDP2,
    ZeRO-3 at its step's start), over the rank's training FLOPs for `micro_batches` of `ZERO_TOKENS_PER_RANK`
    tokens: the scale issue's criterion (at most 3% at 8 micro-batches of 8k tokens). Step snapshots do the same
    products (one subtraction more)."""
    flops = 2 * one_projection_flops(shape, fractions, smaller) / world
    return flops / (6 * shape.parameters() * ZERO_TOKENS_PER_RANK * micro_batches)


def estimation_passes(shape: Shape, budget_bytes: int) -> dict[str, float]:
    """The activation estimate's fp64 statistics (one d×d matrix per distinct layer input) and the
    passes over the reference data `nullspace_statistics_budget_gib` splits them into. The planner
    counts a d_in² bound per weight (`statistic_bytes`), as here; the passes hold the exact sizes."""
    entries = shape.inputs()
    layer = entries[: len(entries) // shape.layers]
    exact = sum(size * size * FP64 for _, size, _ in layer)
    bound = sum(len(outputs) * size * size * FP64 for _, size, outputs in layer)
    per_pass = max(1, budget_bytes // bound)  # whole layers per pass; one if a layer exceeds the budget
    passes = -(-shape.layers // per_pass)
    return {
        "statistics_gib": exact * shape.layers / 2**30,
        "passes": passes,
        "largest_pass_gib": exact * min(per_pass, shape.layers) / 2**30,
        # Each forward ends after its pass' last layer: pass p runs its first p·per_pass layers.
        "decoder_forwards": sum(min((p + 1) * per_pass, shape.layers) for p in range(passes)) / shape.layers,
    }


FLOP_COLUMNS = [(False, 8192), (False, 32768), (True, 8192), (True, 32768)]


FSDP_OWN = "FSDP2's own: received GiB per step"


def _cell(row: dict, column: str, share: str = ".1%") -> str:
    """A table cell: `column`'s GiB and its share of the rank's training memory."""
    return f"{row[f'{column}: GiB']:.2f} ({row[f'{column}: share']:{share}})"


def _by_world(split: dict) -> Iterator[tuple[str, int, dict]]:
    """The split tables' rows: each shape at each world size, in that order."""
    for name in next(iter(split.values())):
        for ranks, rows in split.items():
            yield name, ranks, rows[name]


def report(
    fractions: dict,
    table: dict,
    world: int,
    cache: str,
    block_mib: float,
    estimation: dict,
    budget_gib: float,
    flop_shares: dict,
    zero_shares: dict,
    split: dict,
    step_shares: dict,
    spectra: str = "SmolLM2-135M-Instruct",
    command: str = "make bench-memory",
) -> str:
    lines = [
        f"# What the constraint keeps per rank (`{command}`)",
        "",
        f"Rank fractions `k / d` measured on {spectra} with the default settings (`{cache}`), "
        "applied to each shape's layer inputs (an assumption for other models; experts take the dense MLP's "
        f"fractions). fp32 bases and anchors; {world} ranks; offload blocks of {block_mib:g} MiB. Bytes are what "
        "the code allocates, counted from the shapes (the formula below), not measured on an accelerator.",
        "",
        "| layer input | mean k/d | largest k/d |",
        "|---|---|---|",
        *[f"| {kind} | {value['mean']:.2f} | {value['max']:.2f} |" for kind, value in fractions.items()],
        "",
        "Accelerator memory of the constraint per rank, GiB (share of the rank's training memory), with whole "
        "bases and anchors unless the column says otherwise (the default on one process, DDP and ZeRO-1/2; under "
        "FSDP2 and ZeRO-3 the default is the lean storage, split bases with `smaller` and step snapshots, in the "
        "tables below):",
        "",
    ]
    backends = [  # the split bases have a table of their own, at two world sizes
        column.removesuffix(": GiB")
        for column in next(iter(table.values()))
        if column.endswith(": GiB") and "split bases" not in column and "owned weights" not in column
    ]
    head = ["shape", "parameters (B)", "bases GiB", "anchors GiB", *backends]
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, row in table.items():
        cells = [f"{row['parameters_billions']:.2f}", f"{row['bases_gib']:.2f}", f"{row['anchors_gib']:.2f}"]
        cells += [f"{row[f'{backend}: GiB']:.2f} ({row[f'{backend}: share']:.0%})" for backend in backends]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "With `nullspace_offload`, what moves to the host instead, per rank (ZeRO and FSDP2 alike, once per "
        "optimizer step whatever the gradient accumulation), and the same with "
        "`nullspace_basis_storage: smaller`. Host memory is also given per node of "
        f"{world} processes, which by default (`nullspace_offload_share_node`) read one copy of the bases "
        "(each keeps its own anchor rows or weights):",
        "",
        "| shape | host GiB per rank | per node | copied to the accelerator per step, GiB | smaller: host GiB per "
        "rank | per node | smaller: copied per step, GiB |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {name} | {row['offload: host GiB']:.1f} | {row['offload: node host GiB']:.1f} | "
            f"{row['offload: PCIe GiB per step']:.1f} | {row['smaller + offload: host GiB']:.1f} | "
            f"{row['smaller + offload: node host GiB']:.1f} | {row['smaller + offload: PCIe GiB per step']:.1f} |"
            for name, row in table.items()
        ],
        "",
        "Bases split over the ranks (`nullspace_shard_bases`, FSDP2): each rank keeps its rows of every basis "
        "(or complement) and gathers one whole while the weights reading it are projected; the anchors (or, "
        "with `smaller`, the weights as last projected) are each rank's rows, as before. Per rank, the "
        "constraint's accelerator memory (share of training memory); with `nullspace_step_snapshot` too, what it "
        "holds between optimizer steps (no anchors or weights as last projected) and its snapshot of its rows of "
        "the constrained weights during each step; and what a rank receives per optimizer step "
        "in those all-gathers (every basis twice under the `both` target) against what it receives in FSDP2's "
        f"own collectives at {FSDP_MICRO_BATCHES} micro-batches (bf16 weights gathered for forward and backward, "
        "gradients reduce-scattered):",
        "",
        "| shape | ranks | basis: resident GiB | smaller: resident GiB | basis + step snapshots: between steps "
        "GiB | smaller + step snapshots: between steps GiB | bf16 smaller + step snapshots: between steps GiB | "
        "the snapshot, during the step GiB | basis: received GiB per step (of FSDP2's own) | smaller: received GiB "
        "per step (of FSDP2's own) | bf16 smaller: received GiB per step (of FSDP2's own) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {name} | {ranks} | {_cell(row, 'FSDP2, split bases', '.0%')} | "
            f"{_cell(row, 'FSDP2, smaller + split bases', '.0%')} | "
            f"{_cell(row, 'FSDP2, split bases + step snapshots')} | "
            f"{_cell(row, 'FSDP2, smaller + split bases + step snapshots')} | "
            f"{_cell(row, 'FSDP2, bf16 smaller + split bases + step snapshots')} | "
            f"{row['step snapshot: GiB during the step']:.2f} ({row['step snapshot: share during the step']:.0%}) | "
            + " | ".join(
                f"{row[received]:.1f} ({row[received] / row[FSDP_OWN]:.1%})"
                for received in (
                    "split bases: received GiB per step",
                    "smaller + split bases: received GiB per step",
                    "bf16 smaller + split bases: received GiB per step",
                )
            )
            + " |"
            for name, ranks, row in _by_world(split)
        ],
        "",
        "The same split under DeepSpeed ZeRO-3 (`nullspace_shard_bases`), per rank: its rows of every basis (or "
        "complement) and one whole, or one block, in flight, beside its anchor rows (or weights as last projected), "
        "the rows partitions cut and one weight's fp32 gradient partition; with `nullspace_step_snapshot`, what it "
        "holds between steps (no anchors or weights as last projected; the snapshot during the step is as under "
        "FSDP2); received per step as under FSDP2; with `nullspace_complement_dtype: bfloat16`, the complements "
        "in 2 bytes (6 in flight):",
        "",
        "| shape | ranks | split bases: resident GiB | smaller + split bases: resident GiB | split bases + step "
        "snapshots: between steps GiB | smaller + split bases + step snapshots: between steps GiB | bf16 smaller + "
        "split bases + step snapshots: between steps GiB |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {name} | {ranks} | "
            + " | ".join(
                _cell(row, column)
                for column in (
                    "ZeRO-3, split bases",
                    "ZeRO-3, smaller + split bases",
                    "ZeRO-3, split bases + step snapshots",
                    "ZeRO-3, smaller + split bases + step snapshots",
                    "ZeRO-3, bf16 smaller + split bases + step snapshots",
                )
            )
            + " |"
            for name, ranks, row in _by_world(split)
        ],
        "",
        "Whole-weight ownership, the alternative to split bases (not built; as distributed Muon implementations "
        "own each weight whole on one rank): each rank keeps the stored bases of the weights it owns (byte-balanced, "
        "1/world of them) and one owned weight whole while it is projected, and per projection receives the other "
        "ranks' rows of its weights and then its rows of everyone else's, in fp32. Against split bases with "
        "`smaller`, per rank:",
        "",
        "| shape | ranks | split bases, smaller + step snapshots: between steps GiB | owned weights: GiB | "
        "split bases, smaller: received GiB per step | owned weights: received GiB per step |",
        "|---|---|---|---|---|---|",
        *[
            f"| {name} | {ranks} | {_cell(row, 'FSDP2, smaller + split bases + step snapshots')} | "
            f"{_cell(row, 'owned weights, smaller + step snapshots')} | "
            f"{row['smaller + split bases: received GiB per step']:.1f} | "
            f"{row['owned weights: received GiB per step']:.1f} |"
            for name, ranks, row in _by_world(split)
        ],
        "",
        "The projection's FLOPs per optimizer step on one device, default `both` target, as a share of the "
        "training step's 6·parameters·tokens (a floor on its own-work share, however fast the kernels):",
        "",
        "| shape | basis, 8k tokens | basis, 32k tokens | smaller, 8k tokens | smaller, 32k tokens |",
        "|---|---|---|---|---|",
        *[
            f"| {name} | " + " | ".join(f"{flops[key]:.1%}" for key in FLOP_COLUMNS) + " |"
            for name, flops in flop_shares.items()
        ],
        "",
        f"Sharded over {world} ranks, per rank and optimizer step of {ZERO_TOKENS_PER_RANK} tokens on each rank, as "
        "a share of its training FLOPs: the `update` projection is divided over the ranks, and so is the `both` "
        "target's gradient projection, once per step, under ZeRO-1/2 (inside DeepSpeed's step, bf16 or fp32), "
        "ZeRO-3 (at the start of DeepSpeed's step) and FSDP2. Where DeepSpeed's step cannot take it (ZeRO-1/2 "
        "in fp16, or the constrained weights outside DeepSpeed's first parameter group) a hook projects the "
        "whole gradient on every rank at every micro-batch, so gradient accumulation multiplies it:",
        "",
        "| shape | `update` target | `both`, ZeRO-1/2/3 or FSDP2, any micro-batches | `both`, hook in backward, "
        "1 micro-batch | `both`, hook in backward, 8 micro-batches |",
        "|---|---|---|---|---|",
        *[
            f"| {name} | " + " | ".join(f"{zero[key]:.1%}" for key in ZERO_FLOP_COLUMNS) + " |"
            for name, zero in zero_shares.items()
        ],
        "",
        f"The scale issue's criterion: the `both` target once per step, sharded over {world} ranks (FSDP2, ZeRO-3), "
        f"at {FSDP_MICRO_BATCHES} micro-batches of {ZERO_TOKENS_PER_RANK} tokens per rank, as a share of the rank's "
        "training FLOPs (target: at most 3%):",
        "",
        "| shape | basis | smaller |",
        "|---|---|---|",
        *[f"| {name} | {shares[False]:.2%} | {shares[True]:.2%} |" for name, shares in step_shares.items()],
        "",
        f"Estimation (activation method) with the default `nullspace_statistics_budget_gib: {budget_gib:g}`: the "
        "fp64 statistics of every layer input, the passes over the reference data that keep the statistics "
        "held at once within the budget, and the decoder-layer work of all passes in whole forward passes (each "
        "forward ends after its pass' last layer; `make bench-estimation` measures it on SmolLM2):",
        "",
        "| shape | statistics of all layers GiB | passes | statistics held at once GiB | forward work |",
        "|---|---|---|---|---|",
        *[
            f"| {name} | {row['statistics_gib']:.1f} | {row['passes']} | {row['largest_pass_gib']:.1f} | "
            f"{row['decoder_forwards']:.1f} |"
            for name, row in estimation.items()
        ],
        "",
        "Formula, per rank (bytes, fp32), with bases `B = 4·Σ_inputs d·k` and anchors `A = 4·Σ_weights d_out·k`: "
        "DDP `B + A + 4·max d_out·k`; ZeRO-1/2 `B₁₂ + 2A/world` (`B₁₂`: the bases of the weights the largest of "
        "the `world` equal ranges of the flattened constrained weights reaches, the only ones a rank keeps; each "
        "rank's rows of the anchors and of the coefficients, gradient and masters projected inside DeepSpeed's "
        "step); ZeRO-3 `B + 2A/world + G` with "
        "`G = 4·max d_out·d/world` (one weight's gradient partition in fp32); FSDP2 "
        "`B + A/world + 4·max (d_out/world)·k`; with offload "
        "`S = 4·max (d + 2·d_out/world)·k_b` on the accelerator under FSDP2 (`k_b` = the columns of one block) "
        "and `S + G + X` under ZeRO-3, with `X = min(4·Σ_weights (world − 1)·d, 2·max(block, 4·(world − 1)·max d))` "
        "(the split rows, exchanged in runs of at most one block, two held at once), `S + 4·(world − 1)·max d` "
        "under ZeRO-1/2 (whose `world` flat slices cut at most world − 1 rows), `B + A/world` in host memory and "
        "`2B + A/world` copied per step under the default `both` target. With `nullspace_basis_storage: smaller` "
        "the complement `N` (d × (d − k)) replaces `U` where it is smaller, and each rank keeps its rows of those "
        "weights as last projected (4·(d_out/world)·d) instead of their anchors; ZeRO-3 adds the split rows. Split "
        "bases (FSDP2) keep `B/world` plus the largest basis whole in flight (with bf16 complements, 2 bytes an "
        "element stored and 6 in flight, its bf16 bytes and their fp32 reading); step snapshots replace the anchors "
        "or weights as last projected by one weight's step change while it is projected, and a copy of each rank's "
        "rows of every constrained weight during the optimizer step (`4·Σ_weights (d_out/world)·d`). "
        "Training memory: 14 bytes per "
        "parameter under DDP, `2 + 12/world` under ZeRO-1/2, `14/world` under ZeRO-3 and FSDP2. The scale "
        "issue's target is at most 10% under ZeRO-3 on 8 ranks.",
    ]
    return "\n".join(lines) + "\n"


def require_cache(path: str) -> None:
    """Refuse, with how to write it, a missing subspace cache of SmolLM2 at the default settings."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No subspace cache at {path}: write it with `trl-nullspace prepare smollm2 --output-dir "
            "data/smollm2` and `python recipes/sft.py --config recipes/configs/smollm2-135m_sft.yaml` "
            "(or `trl-nullspace estimate`), or pass --cache."
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=CACHE, help="a subspace cache of SmolLM2 at the default settings")
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--block-mib", type=float, default=64, help="nullspace_offload_block_mib")
    parser.add_argument("--output-dir", default="docs/results")
    parser.add_argument("--stem", default="memory", help="the results' file name, without .md/.json")
    parser.add_argument("--spectra", default="SmolLM2-135M-Instruct", help="the model the cache was estimated on")
    parser.add_argument("--command", default="make bench-memory", help="what made the results, for their title")
    options = parser.parse_args(argv)
    require_cache(options.cache)
    fractions = rank_fractions(options.cache)
    block_bytes = int(options.block_mib * 2**20)
    table = {shape.name: per_rank_bytes(shape, fractions, options.world, block_bytes) for shape in SHAPES}
    split = {
        world: {shape.name: per_rank_bytes(shape, fractions, world, block_bytes) for shape in SHAPES}
        for world in sorted({options.world, SPLIT_WORLD})
    }
    budget_gib = NullSpaceArguments.nullspace_statistics_budget_gib
    estimation = {shape.name: estimation_passes(shape, int(budget_gib * 2**30)) for shape in SHAPES}
    flop_shares = {
        shape.name: {
            (smaller, tokens): projection_flops_share(shape, fractions, tokens, smaller)
            for smaller, tokens in FLOP_COLUMNS
        }
        for shape in SHAPES
    }
    step_shares = {
        shape.name: {
            smaller: sharded_step_flops_share(shape, fractions, options.world, FSDP_MICRO_BATCHES, smaller)
            for smaller in (False, True)
        }
        for shape in SHAPES
    }
    zero_shares = {
        shape.name: {
            (target, micro): zero_flops_share(shape, fractions, options.world, target, micro)
            for target, micro in ZERO_FLOP_COLUMNS
        }
        for shape in SHAPES
    }
    text = report(
        fractions,
        table,
        options.world,
        options.cache,
        options.block_mib,
        estimation,
        budget_gib,
        flop_shares,
        zero_shares,
        split,
        step_shares,
        options.spectra,
        options.command,
    )
    os.makedirs(options.output_dir, exist_ok=True)
    with open(os.path.join(options.output_dir, f"{options.stem}.json"), "w") as handle:
        json.dump(
            {
                "cache": options.cache,
                "spectra": options.spectra,
                "world": options.world,
                "block_mib": options.block_mib,
                "fractions": fractions,
                "shapes": [asdict(s) for s in SHAPES],
                "per_rank": table,
                "estimation": estimation,
                "projection_flops_share": {
                    name: {
                        f"{'smaller' if smaller else 'basis'}, {tokens} tokens": share
                        for (smaller, tokens), share in shares.items()
                    }
                    for name, shares in flop_shares.items()
                },
                "split_bases": {str(world): rows for world, rows in split.items()},
                "sharded_step_flops_share": {
                    name: {"smaller" if smaller else "basis": share for smaller, share in shares.items()}
                    for name, shares in step_shares.items()
                },
                "zero_flops_share": {
                    name: {f"{target}, {micro} micro-batches": share for (target, micro), share in shares.items()}
                    for name, shares in zero_shares.items()
                },
            },
            handle,
            indent=1,
        )
    with open(os.path.join(options.output_dir, f"{options.stem}.md"), "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
