"""`choose_unset_storage`: what the storage options a user left unset become on the backend that runs.

The lean storage (complements where smaller, in bf16, split over the ranks, each step's change projected
from a snapshot instead of anchors) is what keeps the constraint within 10% of a rank's training memory
at 7B and 70B on 8 ranks with the spectra of both real models measured here (`make bench-memory`,
`make bench-memory-gemma`; fp32 complements exceed it at 7B on Gemma-3's), and it is built, exact and
tested under FSDP2 and DeepSpeed ZeRO-3 only. So the options left unset (`nullspace_basis_storage` and
`nullspace_complement_dtype` 'auto', `nullspace_shard_bases` and `nullspace_step_snapshot` unset) choose
it there, and choose the anchored whole fp32 bases elsewhere (one process, DDP, ZeRO-1/2), where the
README's real-model numbers were measured and where nothing splits the bases. An option the user set is
never changed: a setting the backend cannot honour is refused by `check_supported`, as before.

Invariant: after `choose_unset_storage` the four options hold concrete values, which everything else
reads; it is called once per trainer, by `selection.backend_for`, before the backend's refusals.
"""

from __future__ import annotations

from trl_nullspace.config import NullSpaceArguments


def choose_unset_storage(args: NullSpaceArguments, lean_storage_built: bool) -> tuple[str, ...]:
    """Fill `args`' unset storage options for a backend that builds the lean storage or not (module
    docstring); returns what was chosen beyond the anchored whole fp32 bases, as the start summary says it."""
    lean = lean_storage_built and not args.nullspace_offload and args.nullspace_method == "activation"
    chosen = []
    if args.nullspace_basis_storage == "auto":
        # bf16 complements asked for: the complements they describe, on any backend.
        smaller = lean or args.nullspace_complement_dtype == "bfloat16"
        args.nullspace_basis_storage = "smaller" if smaller else "basis"
        if smaller:
            chosen.append("complements where smaller")
    if args.nullspace_complement_dtype == "auto":
        low = lean and args.nullspace_basis_storage == "smaller"
        args.nullspace_complement_dtype = "bfloat16" if low else "float32"
        if low:
            chosen.append("complements in bf16")
    if args.nullspace_shard_bases is None:
        args.nullspace_shard_bases = lean
        if lean:
            chosen.append("bases split over the ranks")
    if args.nullspace_step_snapshot is None:
        args.nullspace_step_snapshot = lean and args.nullspace_projection_target != "gradient"
        if args.nullspace_step_snapshot:
            chosen.append("each step's change projected from a snapshot (no anchors)")
    return tuple(chosen)
