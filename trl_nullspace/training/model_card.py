"""The model card's section on the constraint: what a reader of the card needs to trust the model.

TRL writes the card; the null-space trainers append one section in prose a person reads: which
subspace constrained the weights, estimated from which reference data, how much of it the bases
hold and the largest part of a reference input left outside them, what else trained or stayed
frozen. The exhaustive settings stay in `nullspace_config.json` beside the weights.
"""

from __future__ import annotations

from typing import Any

_SUBSPACES = {
    "activation": "the span of the reference data's layer inputs (activation null space, NSPO-style): an update "
    "with ΔW U = 0 leaves the layer's outputs on those inputs unchanged",
    "gradient": "the span of the reference data's gradients (gradient subspace, OGPSA-style)",
}


def constraint_section(settings: dict[str, Any], reference: str) -> str:
    """Markdown for the card from `nullspace_settings()` and a description of the reference data."""
    rule = settings["rank_selection"]
    chosen = (
        f"energy {rule['energy']}"
        if rule.get("energy") is not None
        else f"eigenvalue threshold {rule['eigenvalue_threshold']}"
    )
    if rule.get("max_rank") is not None:
        chosen += f", at most rank {rule['max_rank']}"
    others = "frozen" if settings["unconstrained_frozen"] else "trained WITHOUT the constraint"
    lines = [
        "## Null-space constraint (trl-nullspace)",
        "",
        f"Trained with {settings['library']}: every update to the {settings['constrained_parameters']} constrained "
        f"weights was kept out of {_SUBSPACES[settings['method']]}.",
        "",
        f"- Reference data (the capabilities protected): {reference}.",
        f"- Subspace: {settings['bases']} bases of rank {settings['rank_min']}–{settings['rank_max']}, chosen by "
        f"{chosen}; {settings['projection_target']} projection.",
    ]
    if settings.get("energy_protected_mean") is not None:
        lines.append(
            f"- The bases hold {settings['energy_protected_mean']:.2%} of the reference energy on average, "
            f"{settings['energy_protected_least']:.2%} at the least-protected input "
            f"(`{settings['energy_protected_least_basis']}`)."
        )
    if settings.get("reference_residual_max") is not None:
        lines.append(
            f"- At most {settings['reference_residual_max']:.2g} of a reference input's size (RMS) lies outside the "
            "protected span: only through it could reference outputs move."
        )
    if settings.get("exempted_inputs"):
        lines.append(
            f"- Harm keys exempted at {settings['exempted_inputs']} layer inputs (each gave up at most "
            f"{settings['exempted_energy_max']:.3%} of its reference energy)."
        )
    lines += [
        f"- Other parameters: {settings['unconstrained_parameters']} {others}.",
        "- Every setting: `nullspace_config.json` beside the weights.",
    ]
    return "\n".join(lines) + "\n"
