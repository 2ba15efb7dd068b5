"""Configuration of the capability-subspace constraint, shared by every null-space trainer.

`NullSpaceArguments` holds only the null-space fields; each trainer's config combines it with the
matching TRL config (`NullSpaceSFTConfig(NullSpaceArguments, SFTConfig)`), so a YAML recipe is a
TRL recipe plus `nullspace_*` keys.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available
from trl import DPOConfig, GRPOConfig, RLOOConfig, SFTConfig

from trl_nullspace.estimation.rank import RankSelection

METHODS = ("activation", "gradient")
PROJECTION_TARGETS = ("update", "gradient", "both")
PROJECTION_DTYPES = ("float32", "bfloat16")
BASIS_STORAGES = ("auto", "basis", "smaller")
COMPLEMENT_DTYPES = ("auto", "float32", "bfloat16")
DEEPSPEED_PROJECTIONS = ("in_step", "around_step")
DEFAULT_ENERGY = 0.99
# `nullspace_scale_learning_rate` (trl_nullspace.training.learning_rate):
CALIBRATION_STEPS = 10  # optimizer steps whose gradients set the scale; fixed afterwards
MAX_SCALE = 20.0  # a gradient almost wholly protected would otherwise amplify what little is left
# Measured, not derived: the default's rate over plain TRL's at matched development refusal on SmolLM2-135M
# (1.5e-4 against 2e-5, `make bench-real-tune`, docs/results/real_tuning.md).
MEASURED_RATE_RATIO = 7.5


@dataclass
class NullSpaceArguments:
    """Fields that say which capability subspace to protect and how.

    Rank selection: set `nullspace_energy` (keep the top directions holding this fraction of the
    reference statistics' energy) or `nullspace_eigenvalue_threshold` (keep directions whose
    eigenvalue exceeds this fraction of the largest), not both. With neither set, an energy of
    0.99 is used. `nullspace_max_rank` caps either.
    """

    nullspace_method: str = field(
        default="activation",
        metadata={
            "help": "'activation': null space of each Linear's reference input covariance (NSPO). "
            "'gradient': span of reference-batch gradients per parameter (OGPSA).",
            "choices": list(METHODS),
        },
    )
    nullspace_projection_target: str = field(
        default="both",
        metadata={
            "help": "'both' (default): project the gradient before the optimizer step, so Adam's statistics see "
            "only the allowed part, and the parameter change after it (exact under AdamW and weight decay). "
            "'update': only the change after the step (exact, but Adam normalises by the whole gradient, so "
            "steps in the allowed directions are small: measured 2x the drift at the same refusal). "
            "'gradient': only the gradient, as the papers do (Adam's per-coordinate scaling leaks).",
            "choices": list(PROJECTION_TARGETS),
        },
    )
    nullspace_projection_dtype: str = field(
        default="float32",
        metadata={
            "help": "Precision of the per-step projection products. 'float32': exact to fp32 round-off. "
            "'bfloat16': bf16 products, preservation only to bf16 round-off (not accumulating over steps); "
            "not measurably faster on an H100 (docs/results). Not used under DeepSpeed, whose master-weight "
            "projection stays fp32.",
            "choices": list(PROJECTION_DTYPES),
        },
    )
    nullspace_basis_storage: str = field(
        default="auto",
        metadata={
            "help": "'basis': keep each basis U (d×k) and the anchors M₀U. 'smaller': where the complement N "
            "(d×(d−k)) is smaller, keep it instead and project with N Nᵀ = I − U Uᵀ, which needs no anchors but "
            "a copy of the weights as last projected, and (d−k)/k of the FLOPs (at the default energy real "
            "models keep k of 70–90% of d). 'auto' (default): 'smaller' under FSDP2 and DeepSpeed ZeRO-3 (with "
            "the lean storage, `backends.storage_choice`), 'basis' elsewhere. Single device, DDP, FSDP2 and "
            "DeepSpeed ZeRO-1/2/3.",
            "choices": list(BASIS_STORAGES),
        },
    )
    nullspace_complement_dtype: str = field(
        default="auto",
        metadata={
            "help": "With nullspace_basis_storage='smaller' (or 'auto', which 'bfloat16' then makes 'smaller' on "
            "every backend): what the complements are stored in. 'bfloat16' halves their memory (and, with "
            "nullspace_shard_bases, what the gathers move). Exact relative to the stored span: every projection "
            "leaves each step's change inside it, and that span is about 2^-9 from the fp32 estimate's, which "
            "costs a measured 2e-7 of the reference energy at the median layer input (at least 757 times less "
            "than the estimate's own sampling noise). Bases kept as U stay fp32. 'auto' (default): 'bfloat16' "
            "with the lean storage under FSDP2 and DeepSpeed ZeRO-3 (`backends.storage_choice`), 'float32' "
            "elsewhere. One process, DDP, FSDP2 and DeepSpeed ZeRO-3; not with nullspace_offload.",
            "choices": list(COMPLEMENT_DTYPES),
        },
    )
    nullspace_offload: bool = field(
        default=False,
        metadata={
            "help": "Keep the bases and anchors in host memory and copy them to the accelerator one block at a time "
            "when projecting (exact: the blocks are orthonormal). The constraint then holds almost no accelerator "
            "memory, at the price of copying every basis over PCIe at each optimizer step. Single device, DDP, "
            "FSDP2 and DeepSpeed ZeRO-3."
        },
    )
    nullspace_step_snapshot: bool | None = field(
        default=None,
        metadata={
            "help": "Project each optimizer step's change, from a snapshot of the weights (each rank its rows) taken "
            "just before the step and freed after it, instead of the change since training began: no anchors "
            "(nor, with nullspace_basis_storage='smaller', the weights as last projected) are held between steps or "
            "saved in checkpoints. The same constraint, exact to fp32 round-off per step; the snapshot costs 4 bytes "
            "per constrained parameter (over the ranks under FSDP2 and ZeRO-3) during the step only. With the "
            "'update' or 'both' target; one process, DDP, FSDP2 and DeepSpeed ZeRO-3 (taken at the start of "
            "DeepSpeed's step); not under ZeRO-1/2 and not with nullspace_offload. Unset (default): on under FSDP2 "
            "and ZeRO-3 where it is built (the lean storage, `backends.storage_choice`), off elsewhere."
        },
    )
    nullspace_shard_bases: bool | None = field(
        default=None,
        metadata={
            "help": "Under FSDP2 and DeepSpeed ZeRO-3: keep 1/world of every basis' rows on each rank and gather one "
            "basis whole (beyond nullspace_offload_block_mib, one column block) just before the weights that read it "
            "are projected (exact: the same stored bytes), so the bases' memory falls as 1/world plus one block, for "
            "one all-gather of every basis per projection (twice per step under the default 'both' target). Not "
            "under ZeRO-1/2 (each rank already keeps only the bases its partition reads) and not with "
            "nullspace_offload. Unset (default): on under FSDP2 and ZeRO-3 with the activation method and without "
            "offload (the lean storage, `backends.storage_choice`), off elsewhere."
        },
    )
    nullspace_deepspeed_projection: str = field(
        default="in_step",
        metadata={
            "help": "Under DeepSpeed ZeRO, where the projections run. 'in_step': inside DeepSpeed's optimizer step "
            "where its optimizer allows (ZeRO-1/2 in bf16 or fp32: each rank its own fragment of the reduced "
            "gradient and of the masters; ZeRO-3: the gradient once per step, each rank its partition), otherwise "
            "around it. 'around_step': always around it (the gradient by a hook in backward on every rank at every "
            "micro-batch, the masters after the step): the same constraint at a higher cost, for comparison "
            "(`make bench-zero`).",
            "choices": list(DEEPSPEED_PROJECTIONS),
        },
    )
    nullspace_offload_block_mib: float = field(
        default=64,
        metadata={
            "help": "With nullspace_offload: the largest block of a basis copied to the accelerator at once (MiB); "
            "with nullspace_shard_bases: the largest gathered at once (larger bases are gathered block by block); "
            "under ZeRO-3 with either, complements or step snapshots: the most weight rows that partitions cut "
            "exchanged at once (more are exchanged in runs)."
        },
    )
    nullspace_offload_share_node: bool = field(
        default=True,
        metadata={
            "help": "With nullspace_offload and several processes on one node: keep one host copy of the bases "
            "per node, in shared memory (/dev/shm), instead of one per process."
        },
    )
    nullspace_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Linear modules to constrain, by name suffix (e.g. q_proj down_proj). Default: every "
            "Linear except the output embedding (lm_head)."
        },
    )
    nullspace_energy: float | None = field(
        default=None, metadata={"help": "Energy fraction of the kept subspace, in (0, 1]."}
    )
    nullspace_eigenvalue_threshold: float | None = field(
        default=None,
        metadata={"help": "Keep directions whose eigenvalue exceeds this fraction of the largest one."},
    )
    nullspace_max_rank: int | None = field(default=None, metadata={"help": "Upper bound on each basis' rank."})
    nullspace_normalize_tokens: bool = field(
        default=True,
        metadata={
            "help": "Activation method: scale every reference token's layer input to unit length before the "
            "statistics, so the few tokens with massive activations that real models have cannot decide the "
            "rank alone (False: raw inputs, where one such token can hold 99.9% of a layer's energy)."
        },
    )
    nullspace_contrastive: bool = field(
        default=False,
        metadata={
            "help": "Activation method: spend the unprotected share of reference energy (1 - nullspace_energy) on "
            "the directions the training data uses most relative to the reference data, instead of on the "
            "directions of least reference energy."
        },
    )
    nullspace_contrast_dataset: str | None = field(
        default=None,
        metadata={
            "help": "nullspace_contrastive: the data the reference inputs are contrasted with, in any format the "
            "reference data takes (e.g. harmful prompts only, as a 'prompt' column: prompt tokens only); the "
            "trainer's contrast_dataset= wins. Unset: the training data."
        },
    )
    nullspace_contrast_split: str = field(default="train", metadata={"help": "Split of the contrast dataset."})
    nullspace_exempt_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Activation method: prompts (a 'prompt' column, as GRPO takes them) with a boolean 'harmful' "
            "column, the format of the refusal reward's data (the trainer's exempt_dataset= wins). Per layer input "
            "of nullspace_exempt_modules, the direction that tells the harmful prompts from the benign ones at the "
            "least cost on the reference inputs, (C + mu I)^-1 (mean harmful - mean benign), is taken out of the "
            "protected basis, so refusal can key on harmfulness in any wording while general inputs, which barely "
            "carry that direction, barely move. Without benign rows the reference inputs' mean stands in. The "
            "reference energy each basis gives up is stated in the start summary and the cache."
        },
    )
    nullspace_exempt_split: str = field(default="train", metadata={"help": "Split of the exempt dataset."})
    nullspace_exempt_modules: list[str] = field(
        default_factory=lambda: ["gate_proj", "up_proj"],
        metadata={
            "help": "With an exempt dataset: the Linears (name suffixes) whose layer input gives up its harm key. "
            "Default: the MLP's gate and up projections, one shared input per layer."
        },
    )
    nullspace_exempt_ridge: float = field(
        default=0.1,
        metadata={
            "help": "With an exempt dataset: mu of the key's whitening, as a fraction of the reference statistic's "
            "mean eigenvalue. Smaller keys on directions general inputs use less (less drift, noisier key)."
        },
    )
    nullspace_statistics_budget_gib: float | None = field(
        default=8.0,
        metadata={
            "help": "Activation method: the most memory the reference statistics (one fp64 d×d matrix per distinct "
            "layer input) may hold at once. Layers whose statistics exceed it together are estimated in several "
            "passes over the reference data, one forward pass each, with the same result (a 7B model's take "
            "89 GB together). None: one pass, whatever it holds."
        },
    )
    nullspace_gradient_batches: int = field(
        default=8, metadata={"help": "Gradient method: reference batches whose gradients span the basis."}
    )
    nullspace_cache_path: str | None = field(
        default=None,
        metadata={
            "help": "A .safetensors file: loaded (and checked against the model) if it exists, written after "
            "estimation otherwise. A folder (existing, or ending in '/'): one file per model and setting in it, "
            "named by a hash of what the cache must match."
        },
    )
    nullspace_cache_overwrite: bool = field(
        default=False,
        metadata={
            "help": "When the cache file does not fit this run (other settings, data or weights, or damaged), "
            "re-estimate and replace it, with a warning naming what differed, instead of refusing."
        },
    )
    nullspace_cache_match_weights: bool = field(
        default=True,
        metadata={
            "help": "Refuse a cache estimated from other weights. Set False to reuse a cache on a model trained "
            "from the cached one under the same constraint, e.g. the DPO stage after null-space SFT."
        },
    )
    nullspace_reference_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Reference (general-capability) dataset: a Hub name, a local data file (json/jsonl/csv/"
            "parquet) or a directory saved with `save_to_disk`. Not DPO's reference model."
        },
    )
    nullspace_reference_split: str = field(default="train", metadata={"help": "Split of the reference dataset."})
    nullspace_reference_num_samples: int | None = field(
        default=512, metadata={"help": "Use at most this many reference examples (None: all)."}
    )
    nullspace_reference_max_length: int = field(
        default=512, metadata={"help": "Truncate reference examples to this many tokens."}
    )
    nullspace_reference_batch_size: int = field(default=8, metadata={"help": "Batch size of the reference pass."})
    nullspace_refresh_steps: int | None = field(
        default=None,
        metadata={"help": "Re-estimate the subspace from the current model every N optimizer steps (None: never)."},
    )
    nullspace_monitor_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Held-out general data (same forms as nullspace_reference_dataset; the trainer's monitor_dataset= "
            "wins) on which to log nullspace/reference_kl and nullspace/reference_loss while training. Off: no cost."
        },
    )
    nullspace_monitor_split: str = field(default="train", metadata={"help": "Split of the monitor dataset."})
    nullspace_monitor_num_samples: int = field(
        default=64, metadata={"help": "Monitor at most this many examples (each check is a forward pass over them)."}
    )
    nullspace_monitor_steps: int | None = field(
        default=None, metadata={"help": "Check drift every N optimizer steps (None: eval_steps, else logging_steps)."}
    )
    nullspace_log_per_layer: bool = field(
        default=False,
        metadata={
            "help": "Also log `nullspace/removed_frac/<parameter>` on logged steps and `nullspace/rank/<basis>` "
            "when training starts (for TensorBoard/W&B; many keys on large models)."
        },
    )
    nullspace_scale_learning_rate: bool = field(
        default=False,
        metadata={
            "help": "Multiply the learning rate by ‖g‖/‖P g‖ (what the projection keeps of the gradient), measured "
            f"over the first {CALIBRATION_STEPS} optimizer steps and then fixed, at most {MAX_SCALE:g}x: the rate TRL "
            "users already use then learns about what plain TRL learns (the default otherwise needed "
            f"~{MEASURED_RATE_RATIO:g}x plain TRL's rate). The step's direction is still projected: the constraint "
            "is unchanged. Single process and DDP.",
        },
    )
    nullspace_freeze_untargeted: bool = field(
        default=True,
        metadata={
            "help": "Freeze trainable parameters outside the constraint (embeddings, norms, lm_head, biases of "
            "target Linears under the activation method). False trains them unconstrained, with a warning."
        },
    )

    def __post_init__(self) -> None:
        if self.nullspace_method not in METHODS:
            raise ValueError(f"nullspace_method must be one of {METHODS}, got {self.nullspace_method!r}.")
        if self.nullspace_projection_dtype not in PROJECTION_DTYPES:
            raise ValueError(
                f"nullspace_projection_dtype must be one of {PROJECTION_DTYPES}, "
                f"got {self.nullspace_projection_dtype!r}."
            )
        if self.nullspace_projection_target not in PROJECTION_TARGETS:
            raise ValueError(
                f"nullspace_projection_target must be one of {PROJECTION_TARGETS}, "
                f"got {self.nullspace_projection_target!r}."
            )
        if self.nullspace_basis_storage not in BASIS_STORAGES:
            raise ValueError(
                f"nullspace_basis_storage must be one of {BASIS_STORAGES}, got {self.nullspace_basis_storage!r}."
            )
        if self.nullspace_deepspeed_projection not in DEEPSPEED_PROJECTIONS:
            raise ValueError(
                f"nullspace_deepspeed_projection must be one of {DEEPSPEED_PROJECTIONS}, "
                f"got {self.nullspace_deepspeed_projection!r}."
            )
        if self.nullspace_energy is not None and self.nullspace_eigenvalue_threshold is not None:
            raise ValueError(
                "Set either nullspace_energy or nullspace_eigenvalue_threshold, not both: they are two ways "
                "of choosing the same rank."
            )
        if self.nullspace_energy is not None and not 0.0 < self.nullspace_energy <= 1.0:
            raise ValueError(f"nullspace_energy must be in (0, 1], got {self.nullspace_energy}.")
        if self.nullspace_eigenvalue_threshold is not None and not 0.0 <= self.nullspace_eigenvalue_threshold < 1.0:
            raise ValueError(
                f"nullspace_eigenvalue_threshold must be in [0, 1), got {self.nullspace_eigenvalue_threshold}."
            )
        if self.nullspace_contrastive and (
            self.nullspace_method != "activation"
            or self.nullspace_eigenvalue_threshold is not None
            or self.nullspace_max_rank is not None
        ):
            raise ValueError(
                "nullspace_contrastive needs nullspace_method='activation' and chooses its rank by nullspace_energy "
                "(the unprotected share of reference energy); unset nullspace_eigenvalue_threshold and "
                "nullspace_max_rank."
            )
        if self.nullspace_contrast_dataset is not None and not self.nullspace_contrastive:
            raise ValueError(
                "nullspace_contrast_dataset is the contrastive rule's data; set nullspace_contrastive=True to use it, "
                "or unset it."
            )
        if self.nullspace_exempt_dataset is not None and self.nullspace_method != "activation":
            raise ValueError(
                "nullspace_exempt_dataset needs nullspace_method='activation': the harm key is a direction of a "
                "layer's input, which the gradient method does not estimate."
            )
        if not self.nullspace_exempt_ridge > 0:
            raise ValueError(f"nullspace_exempt_ridge must be positive, got {self.nullspace_exempt_ridge}.")
        if not self.nullspace_exempt_modules:
            raise ValueError("nullspace_exempt_modules must name at least one Linear (e.g. gate_proj up_proj).")
        for name in (
            "nullspace_max_rank",
            "nullspace_gradient_batches",
            "nullspace_refresh_steps",
            "nullspace_monitor_num_samples",
            "nullspace_monitor_steps",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}.")
        if self.nullspace_statistics_budget_gib is not None and not self.nullspace_statistics_budget_gib > 0:
            raise ValueError(
                f"nullspace_statistics_budget_gib must be positive or None, got {self.nullspace_statistics_budget_gib}"
            )
        if self.nullspace_step_snapshot and self.nullspace_projection_target == "gradient":
            raise ValueError(
                "nullspace_step_snapshot changes how the update is projected after each step, and the 'gradient' "
                "target projects none: set nullspace_projection_target to 'both' or 'update', or unset it."
            )
        if self.nullspace_complement_dtype not in COMPLEMENT_DTYPES:
            raise ValueError(
                f"nullspace_complement_dtype must be one of {COMPLEMENT_DTYPES}, "
                f"got {self.nullspace_complement_dtype!r}."
            )
        if self.nullspace_complement_dtype == "bfloat16" and (
            self.nullspace_basis_storage == "basis" or self.nullspace_offload
        ):
            raise ValueError(
                "nullspace_complement_dtype applies to the complements nullspace_basis_storage='smaller' keeps (as "
                "'auto' does when it is set), and not with nullspace_offload yet: set nullspace_basis_storage to "
                "'smaller' or 'auto' without offload, or unset it."
            )
        if self.nullspace_step_snapshot and self.nullspace_offload:
            raise ValueError(
                "nullspace_step_snapshot is not supported with nullspace_offload yet (the snapshot would cross to "
                "host memory and back at every step); set one of them."
            )
        if self.nullspace_shard_bases and self.nullspace_offload:
            raise ValueError(
                "nullspace_shard_bases and nullspace_offload are two ways to take the bases off the accelerator "
                "(split over the ranks, or in host memory); set one of them."
            )
        if not self.nullspace_offload_block_mib > 0:
            raise ValueError(f"nullspace_offload_block_mib must be positive, got {self.nullspace_offload_block_mib}.")
        if getattr(self, "bf16", False) is None and not (is_torch_bf16_gpu_available() or is_torch_xla_available()):
            # TRL turns bf16 on when it is unset, and transformers then refuses a machine without a bf16 GPU
            # ("Your setup doesn't support bf16/gpu"): unset on such a machine, train in fp32 instead.
            self.bf16 = False
        parent_post_init = getattr(super(), "__post_init__", None)
        if parent_post_init is not None:
            parent_post_init()  # TRL's rename warning is ignored package-wide (`library_notices`)

    @classmethod
    def from_trl_config(cls, args: Any) -> Any:
        """`args` (TRL's own config, e.g. `SFTConfig`) as this class, with every setting as TRL resolved
        it and the `nullspace_*` defaults: what a null-space trainer given TRL's config trains with.
        Copied, not parsed again: a second `__post_init__` would re-derive what TRL already derived
        (GRPO's `generation_batch_size` from `steps_per_generation` would then conflict)."""
        converted = copy.copy(args)
        converted.__class__ = cls
        for item in dataclasses.fields(NullSpaceArguments):
            default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
            setattr(converted, item.name, default)
        return converted

    @property
    def nullspace_statistics_budget_bytes(self) -> int | None:
        budget = self.nullspace_statistics_budget_gib
        return None if budget is None else int(budget * 2**30)

    @property
    def nullspace_offload_block_bytes(self) -> int | None:
        """The offloaded bases' block size in bytes, or None where the bases stay with the weights."""
        return int(self.nullspace_offload_block_mib * 2**20) if self.nullspace_offload else None

    @property
    def nullspace_rank_selection(self) -> RankSelection:
        """The rank rule these fields describe, with the default energy filled in."""
        energy = self.nullspace_energy
        if energy is None and self.nullspace_eigenvalue_threshold is None:
            energy = DEFAULT_ENERGY
        return RankSelection(
            energy=energy, eigenvalue_threshold=self.nullspace_eigenvalue_threshold, max_rank=self.nullspace_max_rank
        )


@dataclass
class NullSpaceSFTConfig(NullSpaceArguments, SFTConfig):
    """`trl.SFTConfig` plus the `nullspace_*` fields of `NullSpaceArguments`."""


@dataclass
class NullSpaceDPOConfig(NullSpaceArguments, DPOConfig):
    """`trl.DPOConfig` plus the `nullspace_*` fields. DPO's `ref_model` and the null-space reference
    *dataset* (`nullspace_reference_dataset`) are unrelated: one anchors the DPO loss, the other
    defines the capabilities to preserve."""


@dataclass
class NullSpaceGRPOConfig(NullSpaceArguments, GRPOConfig):
    """`trl.GRPOConfig` plus the `nullspace_*` fields; projection runs once per optimizer step, also
    when one generation batch feeds several (`steps_per_generation`, `num_iterations`)."""


@dataclass
class NullSpaceRLOOConfig(NullSpaceArguments, RLOOConfig):
    """`trl.RLOOConfig` plus the `nullspace_*` fields."""
