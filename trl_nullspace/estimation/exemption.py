"""Harm-keyed exemption: one direction per layer input taken out of the protected basis.

The activation null space protects every direction general inputs use, and general instructions
use the directions harmful instructions use too, so refusal learnt under it barely reaches harmful
requests in forms the safety data did not show (`make bench-unseen`). Here, per exempted layer
input, the *key* is the direction that tells harmful prompts from benign ones at the least cost on
the reference inputs (the least-drift key of MEMIT-style edits):

    k = (C + μ I)⁻¹ (m_harmful − m_benign),   C = the reference inputs' second moment,

and its component inside the protected span is freed (the basis loses one direction). An update
may then respond to `k·x`, which harmful prompts carry and reference inputs, whose `(k·x)²` is
minimal for the separation bought, barely do. The cost is stated, not hidden: the reference energy
the basis no longer holds is recorded per input (`CapabilitySubspace.energy`) and reported in the
start summary; the constraint stays exact for the basis that remains.

Measured on SmolLM2-135M-Instruct before training (`make bench-harm-keys`): keyed on harmful
prompts in two forms against benign look-alikes, the key separates an unseen risk area's requests
in HarmBench's form from general prompts and look-alikes with AUROC 0.85–0.87 at four middle
layers' MLP inputs (0.68–0.84 at the others), where reference inputs carry 12–13% of the harmful
prompts' `(k·x)²`. The cost is one forward pass over each class of prompts per estimation pass,
and nothing per training step (the basis is only one column smaller).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trl_nullspace.estimation.reference import ReferenceBatch
from trl_nullspace.projection.targets import matches_suffix

# A key whose component inside the protected span is below this share of its length is already free.
FREE_ALREADY = 1e-6


@dataclass
class Exemption:
    """What to exempt: the layer inputs of the Linears whose names end in one of `modules`, each keyed
    on `harmful` prompts against `benign` ones (None: the reference inputs' mean stands in for the
    benign side), whitened with `ridge` (`harm_key`)."""

    harmful: list[ReferenceBatch]
    benign: list[ReferenceBatch] | None
    modules: list[str]
    ridge: float

    def covers(self, members: list[str]) -> bool:
        """Whether a layer input shared by the Linears `members` is exempted (one basis serves them all)."""
        return any(matches_suffix(name, self.modules) for name in members)


def harm_key(
    reference: torch.Tensor,
    reference_tokens: int,
    harmful_mean: torch.Tensor,
    benign_mean: torch.Tensor,
    ridge: float,
) -> torch.Tensor:
    """The unit least-drift key `(C + μI)⁻¹ d` of one layer input (fp64).

    `reference` is the summed `Xᵀ X` of `reference_tokens` tokens; `μ = ridge × trace(C) / d` (the
    mean eigenvalue), so `ridge` means the same at every layer and model size. A small ridge keys on
    directions general inputs barely use (little drift, but noisier); a large one approaches the
    plain difference of means."""
    if reference_tokens == 0:
        raise ValueError("The reference data gave this layer input no token: no key can be whitened against it.")
    second_moment = reference / reference_tokens
    dimension = second_moment.shape[0]
    mu = ridge * second_moment.trace() / dimension
    identity = torch.eye(dimension, dtype=second_moment.dtype, device=second_moment.device)
    key = torch.linalg.solve(second_moment + mu * identity, harmful_mean - benign_mean)
    norm = key.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("The harmful and benign prompts have the same mean input here: there is no key to exempt.")
    return key / norm


def exempt_direction(basis: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """`basis` (d×k, orthonormal) with `key`'s component inside its span removed: an orthonormal
    d×(k−1) basis of span(basis) ∩ (U Uᵀ key)^⊥. Computed in the k-dimensional coordinates (a
    Householder reflection sends the key's coordinates to the first axis, which is dropped), so the
    result is orthonormal to round-off without a second factorisation."""
    key = key.double().to(basis.device)
    coordinates = basis.T.double() @ key
    norm = coordinates.norm()
    if norm <= FREE_ALREADY * key.norm():  # the key lies outside the protected span (to round-off): nothing to free
        return basis
    unit = coordinates / norm
    first = torch.zeros_like(unit)
    first[0] = 1.0
    reflector = unit - first
    if reflector.norm() > 0:
        reflector = reflector / reflector.norm()
    reflected = basis.double() - 2.0 * (basis.double() @ reflector).unsqueeze(1) * reflector.unsqueeze(0)
    return reflected[:, 1:].to(basis.dtype).contiguous()


def energy_share(basis: torch.Tensor, reference: torch.Tensor) -> float:
    """The share of the reference statistic's energy that `basis` holds."""
    total = reference.trace().item()
    if total == 0:
        return 1.0
    basis = basis.to(reference.device, reference.dtype)
    return (basis.T @ reference @ basis).trace().item() / total
