"""What a run says about its constraint: the settings saved beside the model and in its card
(`constraint_settings`), and the summary printed when training starts (`start_summary`).

Both read a `CapabilityConstraint` and change nothing. The summary states what the defaults
protect and what they leave open (the reference energy outside the bases, the harm keys
exempted, the parameters left unconstrained), so every run's log shows the guarantee it has.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trl_nullspace._version import __version__
from trl_nullspace.training.learning_rate import rate_note

if TYPE_CHECKING:
    from trl_nullspace.training.constraint import CapabilityConstraint


def constraint_settings(constraint: CapabilityConstraint) -> dict[str, Any]:
    """The constraint a run trains under: saved next to the model (`nullspace_config.json`) and in its card."""
    args, subspace, projector = constraint.args, constraint.subspace, constraint.projector
    ranks = [basis.shape[1] for basis in subspace.bases.values()]
    kept = {key: subspace.energy_kept(key) for key in subspace.bases}
    known = {key: value for key, value in kept.items() if value is not None}
    least = min(known, key=known.get) if known else None
    frozen = args.nullspace_freeze_untargeted
    exempted: dict[str, float] = subspace.settings.get("exempted", {})
    activation = subspace.method == "activation"
    return {
        "library": f"trl-nullspace {__version__}",
        "method": subspace.method,
        "projection_target": args.nullspace_projection_target,
        "projection_dtype": args.nullspace_projection_dtype,
        "offload": args.nullspace_offload,
        "offload_shared_on_node": any(item.shared.node_shared for item in projector.constrained),
        "basis_storage": args.nullspace_basis_storage,
        "shard_bases": args.nullspace_shard_bases,
        "step_snapshot": args.nullspace_step_snapshot,
        "complement_dtype": args.nullspace_complement_dtype,
        "weights_with_complements": sum(item.shared.complement for item in projector.constrained),
        "rank_selection": args.nullspace_rank_selection.to_dict(),
        "target_modules": args.nullspace_target_modules,
        "bases": len(ranks),
        "rank_min": min(ranks),
        "rank_max": max(ranks),
        "normalize_tokens": args.nullspace_normalize_tokens,
        "contrastive": args.nullspace_contrastive,
        # The harm-keyed exemption: per exempted layer input, the reference energy its basis gave up.
        "exempted_inputs": len(exempted),
        "exempted_energy_max": round(max(exempted.values()), 6) if exempted else None,
        "exempted_energy_max_basis": max(exempted, key=exempted.get) if exempted else None,
        "energy_protected_mean": round(sum(known.values()) / len(known), 6) if known else None,
        "energy_protected_least": round(known[least], 6) if known else None,
        "energy_protected_least_basis": least,
        # RMS share of a reference token's layer input outside the protected span, at the least-protected
        # basis: a layer's reference outputs move by at most ‖ΔW‖·residual·‖x‖ (activation method).
        "reference_residual_max": subspace.residual(least) if known and activation else None,
        "constrained_parameters": len(projector.constrained),
        # Counted when they were frozen: a resumed run binds again after they already are.
        "unconstrained_parameters": len(constraint.frozen) if frozen else len(projector.unconstrained),
        "unconstrained_frozen": frozen,
        "subspace_mib": round(subspace.num_bytes() / 2**20, 3),
        "cache_path": constraint.source.cache_file,
    }


def start_summary(constraint: CapabilityConstraint, learning_rate: float) -> str:
    """One paragraph printed when training starts, so the constraint is visible in every run's log."""
    settings = constraint_settings(constraint)
    others = "frozen" if settings["unconstrained_frozen"] else "train UNCONSTRAINED"
    where = ""
    if settings["offload"]:
        where = ", in host memory" + (", one copy per node" if settings["offload_shared_on_node"] else "")
    complements = ""
    if settings["basis_storage"] == "smaller":
        complements = f" ({settings['weights_with_complements']} through their bases' complements)"
    projection = settings["projection_target"] + (
        " (each step's change, no anchors)" if settings["step_snapshot"] else ""
    )
    summary = (
        f"trl-nullspace: {settings['method']} subspace, {projection} projection; "
        f"{settings['bases']} bases of rank {settings['rank_min']}–{settings['rank_max']} "
        f"({settings['subspace_mib']} MiB{where}) "
        f"constrain {settings['constrained_parameters']} weights"
        f"{complements}; "
        f"{settings['unconstrained_parameters']} other parameters {others}."
    )
    if settings["energy_protected_mean"] is not None:
        summary += (
            f" The bases hold {settings['energy_protected_mean']:.2%} of the reference data's "
            f"{'gradient' if settings['method'] == 'gradient' else 'layer-input'} energy on average "
            f"(least {settings['energy_protected_least']:.2%}, {settings['energy_protected_least_basis']}); "
            "updates may move reference outputs only through the rest"
        )
        residual = settings["reference_residual_max"]
        summary += (
            "."
            if residual is None
            else f": at most {residual:.2g} of a reference input's size (RMS) lies "
            "outside the protected span, so a layer's reference outputs move by at most ‖ΔW‖ times that."
        )
    if settings["exempted_inputs"]:
        summary += (
            f" Harm keys exempted at {settings['exempted_inputs']} layer inputs: each basis gave up at most "
            f"{settings['exempted_energy_max']:.3%} of its reference energy "
            f"({settings['exempted_energy_max_basis']}), through which reference outputs may move."
        )
    peak = constraint.source.gather_peak
    if peak is not None:
        summary += (
            f" The set-up gathered at most {peak.peak} of {peak.total} weight values at once "
            f"({peak.peak / peak.total:.0%}; ZeRO-3: the estimate layer by layer, the anchors weight by weight)."
        )
    summary += rate_note(learning_rate, scaled=constraint.metrics.rate_scaler is not None)
    summary += constraint.backend.summary()  # e.g. where DeepSpeed's projections run, built as training begins
    return summary
