"""Settings under which the constraint holds only approximately: each is named in a warning at start.

The guarantee the trainers state (reference outputs move only through what the bases leave out,
`CapabilitySubspace.residual`) assumes fp32 weights, the activation method, the update projected
after every step, fp32 projection products and a rank rule that bounds the residual. A user may
trade each away knowingly, for speed or memory; none may be traded silently. So every approximate
setting in force gets one warning saying what is no longer protected and how to get the exact
behaviour back.

Cost: a pass over the constrained parameters' dtypes and the bases' ranks and energies, once at set-up.
"""

from __future__ import annotations

import math

import torch
from transformers.utils import logging

from trl_nullspace.config import NullSpaceArguments
from trl_nullspace.estimation.subspace import CapabilitySubspace

logger = logging.get_logger(__name__)

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def approximations(
    args: NullSpaceArguments, subspace: CapabilitySubspace, constrained: list[torch.Tensor]
) -> list[str]:
    """One sentence per approximate setting in force: what it leaves unprotected and the exact setting."""
    found = []
    low = sorted(
        {str(parameter.dtype).removeprefix("torch.") for parameter in constrained if parameter.dtype in _LOW_PRECISION}
    )
    if low:
        found.append(
            f"the constrained weights are held in {'/'.join(low)}: rounding each step's weights to that format "
            "is not in the null space, so reference outputs move by the format's rounding floor whatever the "
            "projection does (tests/test_guards.py measures it). Load the model in float32 (dtype=torch.float32) "
            "and train with bf16=True autocast to keep them within fp32 round-off"
        )
    if args.nullspace_method == "gradient":
        found.append(
            "nullspace_method='gradient' keeps updates out of the reference gradients' span, which protects the "
            "reference loss to first order, not the reference outputs; use nullspace_method='activation' for "
            "outputs held exactly"
        )
    if args.nullspace_projection_target == "gradient":
        found.append(
            "nullspace_projection_target='gradient' projects only the gradient: Adam's moments and weight decay "
            "still move weights inside the subspace (docs/concepts.md); use 'both' (the default) or 'update'"
        )
    if args.nullspace_projection_dtype != "float32":
        found.append(
            f"nullspace_projection_dtype='{args.nullspace_projection_dtype}' leaves each step's change in the "
            "subspace at that format's round-off (not accumulating over steps); use 'float32' for fp32 round-off"
        )
    threshold_residual = _threshold_residual(args, subspace)
    if threshold_residual is not None:
        found.append(threshold_residual)
    cap = args.nullspace_max_rank
    if cap is not None:
        capped = [key for key, basis in subspace.bases.items() if basis.shape[1] == cap < basis.shape[0]]
        if capped:
            least = min(capped, key=lambda key: subspace.energy_kept(key) or 0.0)
            kept = subspace.energy_kept(least)
            share = f"; {least} keeps {kept:.2%} of its reference energy" if kept is not None else ""
            found.append(
                f"nullspace_max_rank={cap} caps {len(capped)} bases at its value, possibly below what the rank rule "
                f"asked for{share}; unset it to protect what the rule selects"
            )
    return found


def _threshold_residual(args: NullSpaceArguments, subspace: CapabilitySubspace) -> str | None:
    """An eigenvalue threshold t drops every direction below t·λ_max, but many such directions add up:
    the reference inputs can keep more than √t of their size outside the span (the tests' tiny Qwen2
    with 350 reference tokens at t = 1e-3: 0.044 at its second down_proj, and 12 steps at 1e-2 moved
    the reference logits by 0.50). Named with the rule that does bound it: nullspace_energy = 1 − r²
    keeps the RMS residual at most r."""
    threshold = args.nullspace_rank_selection.eigenvalue_threshold
    if threshold is None or subspace.method != "activation":
        return None
    residuals = {key: value for key in subspace.bases if (value := subspace.residual(key)) is not None}
    over = {key: value for key, value in residuals.items() if value > math.sqrt(threshold)}
    if not over:
        return None
    worst = max(over, key=over.get)
    return (
        f"nullspace_eigenvalue_threshold={threshold:g} leaves up to {over[worst]:.2g} of the reference inputs' size "
        f"(RMS) outside the protected span at {len(over)} of {len(residuals)} layer inputs (worst: {worst}), more "
        f"than √threshold = {math.sqrt(threshold):.2g}: the many directions below the threshold add up, and "
        "reference outputs may move by ‖ΔW‖ times that. To bound it by r, set nullspace_energy=1 - r**2 instead "
        "(e.g. 1 - 1e-12 for r = 1e-6)"
    )


def warn_approximations(
    args: NullSpaceArguments, subspace: CapabilitySubspace, constrained: list[torch.Tensor]
) -> None:
    for sentence in approximations(args, subspace, constrained):
        logger.warning("trl-nullspace: approximate constraint: %s.", sentence)
