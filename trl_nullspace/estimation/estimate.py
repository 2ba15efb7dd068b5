"""Estimators of the capability subspace from a reference set."""

from __future__ import annotations

from torch import nn

from trl_nullspace.config import NullSpaceArguments
from trl_nullspace.estimation.activation import estimate_activation_subspace
from trl_nullspace.estimation.exemption import Exemption
from trl_nullspace.estimation.gradient import estimate_gradient_subspace
from trl_nullspace.estimation.reference import ReferenceBatch
from trl_nullspace.estimation.subspace import CapabilitySubspace
from trl_nullspace.projection.targets import find_target_experts, find_target_linears


def estimate_subspace(
    model: nn.Module,
    batches: list[ReferenceBatch],
    settings: NullSpaceArguments,
    show_progress: bool = True,
    contrast_batches: list[ReferenceBatch] | None = None,
    across_processes: bool = False,
    exemption: Exemption | None = None,
) -> CapabilitySubspace:
    """The subspace `settings` asks for (method, target modules, rank rule), from `batches`; the
    contrastive rule also needs `contrast_batches` (the training data), the harm-keyed exemption its
    prompts (`exemption`). With `across_processes` (activation method only), each process reads its
    share of the batches and the statistics are summed."""
    linears = find_target_linears(model, settings.nullspace_target_modules)
    selection = settings.nullspace_rank_selection
    if settings.nullspace_contrastive and contrast_batches is None:
        raise ValueError("nullspace_contrastive needs the training data's batches (contrast_batches).")
    if settings.nullspace_method == "activation":
        return estimate_activation_subspace(
            model,
            batches,
            linears,
            selection,
            show_progress,
            normalize_tokens=settings.nullspace_normalize_tokens,
            contrast_batches=contrast_batches if settings.nullspace_contrastive else None,
            experts=find_target_experts(model, settings.nullspace_target_modules),
            statistics_budget_bytes=settings.nullspace_statistics_budget_bytes,
            across_processes=across_processes,
            exemption=exemption,
        )
    return estimate_gradient_subspace(
        model, batches, linears, selection, settings.nullspace_gradient_batches, show_progress
    )


__all__ = ["Exemption", "estimate_activation_subspace", "estimate_gradient_subspace", "estimate_subspace"]
