"""NSPO-style estimation: the span of each distinct Linear input on the reference data."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from trl_nullspace.rank import RankSelection
from trl_nullspace.reference import ReferenceBatch
from trl_nullspace.subspace import CapabilitySubspace


class InputCovarianceCollector:
    """Forward pre-hooks that accumulate `Xᵀ X` (fp64, padding masked out) per distinct input.

    fp64 because the smallest real eigenvalues of a layer input's covariance sit near fp32's
    round-off floor (~1e-7 of the largest): in fp32 a strict threshold cannot tell them from
    noise, and the directions it drops are ones the reference data does use.

    Linears fed the same tensor one after another (q/k/v on the normed hidden state, gate/up in
    an MLP) form one group: the statistic is accumulated once, by the group's first module, and
    every member shares the resulting basis. Only the previous hook's input is held, so no layer
    input outlives its use.
    """

    def __init__(self, linears: dict[str, nn.Linear]):
        self.linears = linears
        self.group_of: dict[str, str] = {}
        self.covariances: dict[str, torch.Tensor] = {}
        self.token_counts: dict[str, int] = {}
        self._mask: torch.Tensor | None = None
        self._last_input: torch.Tensor | None = None
        self._last_leader: str | None = None

    def _hook(self, name: str):
        def accumulate(module: nn.Module, args: tuple) -> None:
            inputs = args[0]
            if inputs is self._last_input:
                self._assign(name, self._last_leader)
                return
            self._last_input, self._last_leader = inputs, name
            self._assign(name, name)
            if inputs.shape[:-1] != self._mask.shape:
                raise ValueError(
                    f"Input of {name} has shape {tuple(inputs.shape)}; expected (batch, sequence, features) "
                    f"matching the attention mask {tuple(self._mask.shape)} so padding can be masked out."
                )
            tokens = inputs[self._mask].double()
            covariance = tokens.T @ tokens
            if name in self.covariances:
                self.covariances[name] += covariance
            else:
                self.covariances[name] = covariance
            self.token_counts[name] = self.token_counts.get(name, 0) + tokens.shape[0]

        return accumulate

    def _assign(self, name: str, leader: str) -> None:
        previous = self.group_of.setdefault(name, leader)
        if previous != leader:
            raise RuntimeError(
                f"{name} shared its input with {previous} in one forward pass and with {leader} in another; "
                "the model's call order is not stable, so inputs cannot be grouped."
            )

    @torch.no_grad()
    def collect(self, model: nn.Module, batches: list[ReferenceBatch], show_progress: bool) -> None:
        device = next(model.parameters()).device
        handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in self.linears.items()]
        try:
            for batch in tqdm(batches, desc="nullspace: reference inputs", disable=not show_progress):
                batch = batch.to(device)
                self._mask = batch.attention_mask.bool()
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
                self._last_input = self._last_leader = None
        finally:
            for handle in handles:
                handle.remove()
            self._mask = None
        missing = sorted(set(self.linears) - set(self.group_of))
        if missing:
            raise RuntimeError(f"Target layers {missing[:5]} were never called on the reference data.")


def top_eigenvectors(covariance: torch.Tensor, selection: RankSelection) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal top eigenvectors (fp32) of a symmetric PSD matrix (`eigh`, not `svd`: ~11× faster)."""
    if not torch.isfinite(covariance).all():
        raise FloatingPointError("The reference input covariance contains NaN or inf.")
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    rank = selection.rank(eigenvalues)
    return eigenvectors[:, :rank].float().contiguous(), eigenvalues.float()


def estimate_activation_subspace(
    model: nn.Module,
    batches: list[ReferenceBatch],
    linears: dict[str, nn.Linear],
    selection: RankSelection,
    show_progress: bool = True,
) -> CapabilitySubspace:
    """Bases `U` (d_in×k) of the reference inputs of every target Linear."""
    was_training = model.training
    model.eval()
    collector = InputCovarianceCollector(linears)
    try:
        collector.collect(model, batches, show_progress)
    finally:
        model.train(was_training)
    bases, eigenvalues = {}, {}
    for leader, covariance in collector.covariances.items():
        bases[leader], eigenvalues[leader] = top_eigenvectors(covariance, selection)
    return CapabilitySubspace(
        method="activation",
        bases=bases,
        targets=dict(collector.group_of),
        eigenvalues=eigenvalues,
        settings={"reference_tokens": max(collector.token_counts.values())},
    )
