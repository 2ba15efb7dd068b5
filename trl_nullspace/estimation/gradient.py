"""OGPSA-style estimation: an orthonormal basis of reference-batch gradients per parameter."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from trl_nullspace.estimation.modes import evaluating
from trl_nullspace.estimation.rank import RankSelection
from trl_nullspace.estimation.reference import ReferenceBatch
from trl_nullspace.estimation.subspace import CapabilitySubspace


def target_parameters(linears: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    """Weights and biases of the target linear layers (routers may have no bias), by canonical name."""
    parameters = {}
    for name, module in linears.items():
        parameters[f"{name}.weight"] = module.weight
        if getattr(module, "bias", None) is not None:
            parameters[f"{name}.bias"] = module.bias
    return parameters


def gradient_basis(gradients: torch.Tensor, selection: RankSelection) -> tuple[torch.Tensor, torch.Tensor]:
    """Top left-singular vectors (numel×k) of the gradient matrix, from the small n×n Gram matrix.

    `gradients` is n×numel with n (batches) tiny next to numel, so the eigen-decomposition of
    `G Gᵀ` is cheap; a final QR restores exact orthonormality lost to round-off.
    """
    gram = (gradients.double() @ gradients.double().T).float()
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    rank = selection.rank(eigenvalues)
    if rank == 0:
        return gradients.new_zeros((gradients.shape[1], 0)), eigenvalues
    basis = gradients.T @ (eigenvectors[:, :rank] / eigenvalues[:rank].sqrt())
    return torch.linalg.qr(basis).Q.contiguous(), eigenvalues


def estimate_gradient_subspace(
    model: nn.Module,
    batches: list[ReferenceBatch],
    linears: dict[str, nn.Linear],
    selection: RankSelection,
    num_batches: int,
    show_progress: bool = True,
) -> CapabilitySubspace:
    """Bases of the causal-LM gradients of `num_batches` reference batches, per target parameter."""
    parameters = target_parameters(linears)
    frozen = [name for name, parameter in parameters.items() if not parameter.requires_grad]
    if frozen:
        raise ValueError(
            f"The gradient method needs trainable target parameters, but {frozen[:3]} are frozen "
            "(a LoRA model's base weights are: use nullspace_method='activation' with LoRA)."
        )
    device = next(model.parameters()).device
    collected: dict[str, list[torch.Tensor]] = {name: [] for name in parameters}
    with evaluating(model):
        try:
            for batch in tqdm(batches[:num_batches], desc="nullspace: reference gradients", disable=not show_progress):
                batch = batch.to(device)
                model.zero_grad(set_to_none=True)
                model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels()
                ).loss.backward()
                for name, parameter in parameters.items():
                    if parameter.grad is None:
                        raise RuntimeError(f"{name} received no gradient from the reference loss.")
                    if not torch.isfinite(parameter.grad).all():
                        raise FloatingPointError(f"The reference gradient of {name} contains NaN or inf.")
                    collected[name].append(parameter.grad.detach().float().flatten().clone())
        finally:
            model.zero_grad(set_to_none=True)
    bases, eigenvalues = {}, {}
    for name, gradients in collected.items():
        bases[name], eigenvalues[name] = gradient_basis(torch.stack(gradients), selection)
    return CapabilitySubspace(
        method="gradient",
        bases=bases,
        targets={name: name for name in parameters},
        eigenvalues=eigenvalues,
        settings={"gradient_batches": min(num_batches, len(batches))},
    )
