"""The capability subspace: orthonormal bases and which weights each one constrains."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class CapabilitySubspace:
    """Orthonormal bases `U` (n×k) of the directions that general capabilities depend on.

    `method == "activation"`: one basis per *distinct* Linear input (q/k/v share one, gate/up share
    one); `U` spans the reference inputs, so an update `ΔW` with `ΔW U = 0` leaves the Linear's
    outputs on those inputs unchanged. `targets` maps each Linear's name to its basis key.

    `method == "gradient"`: one basis per parameter, spanning its reference-batch gradients in the
    flattened parameter space (numel×k). `targets` maps each parameter's name to its basis key.

    Names are those of the base model (PEFT's `base_model.model.` and `.base_layer` removed), so a
    subspace estimated on a base model serves a LoRA model built from it.
    """

    method: str
    bases: dict[str, torch.Tensor]
    targets: dict[str, str]
    eigenvalues: dict[str, torch.Tensor] = field(default_factory=dict)
    energy: dict[str, float] = field(default_factory=dict)
    settings: dict[str, object] = field(default_factory=dict)

    def residual(self, key: str) -> float | None:
        """RMS share of a reference layer input that lies outside basis `key`'s span, √(1 − energy
        kept) (activation method; with normalised tokens, the RMS over reference tokens of
        ‖(I − U Uᵀ) x‖ / ‖x‖). An update ΔW with ΔW U = 0 changes the layer's reference outputs by
        at most ‖ΔW‖ times this share of the inputs' size: the tolerance the constraint states."""
        kept = self.energy_kept(key)
        return None if kept is None else math.sqrt(max(0.0, 1.0 - kept))

    def basis_for(self, target: str) -> torch.Tensor:
        return self.bases[self.targets[target]]

    def energy_kept(self, key: str) -> float | None:
        """Share of the reference statistic's energy in the kept directions (None if unknown): recorded
        by the estimator (`energy`), or the top eigenvalues' share of the spectrum."""
        if key in self.energy:
            return self.energy[key]
        values = self.eigenvalues.get(key)
        if values is None or values.numel() == 0:
            return None
        values = values.double().clamp_min(0.0)
        total = values.sum().item()
        return values[: self.bases[key].shape[1]].sum().item() / total if total > 0 else 0.0

    def num_bytes(self) -> int:
        return sum(basis.numel() * basis.element_size() for basis in self.bases.values())

    def overview(self) -> str:
        """A few lines for a person: size, ranks as a share of their dimension, the energy kept (mean and
        least) and the largest reference residual; `summary` lists every basis."""
        lines = [f"{self.method} subspace, {len(self.bases)} bases, {self.num_bytes() / 2**20:.2f} MiB"]
        shares = {key: basis.shape[1] / basis.shape[0] for key, basis in self.bases.items() if basis.shape[0]}
        if shares:
            low, high = min(shares, key=shares.get), max(shares, key=shares.get)
            lines.append(
                f"  ranks: {self.bases[low].shape[1]}/{self.bases[low].shape[0]} ({low}) to "
                f"{self.bases[high].shape[1]}/{self.bases[high].shape[0]} ({high}) of their dimensions"
            )
        kept = {key: value for key in self.bases if (value := self.energy_kept(key)) is not None}
        if kept:
            least = min(kept, key=kept.get)
            lines.append(
                f"  energy kept: {sum(kept.values()) / len(kept):.2%} on average, least {kept[least]:.2%} ({least})"
            )
            if self.method == "activation":
                lines.append(
                    f"  reference inputs outside the protected span: at most {self.residual(least):.2g} (RMS)"
                )
        return "\n".join(lines)

    def summary(self) -> str:
        """One line per basis: `key  rank/dimension  (targets)`; for logs and `inspect --per-layer`."""
        users: dict[str, list[str]] = {}
        for target, key in self.targets.items():
            users.setdefault(key, []).append(target.rsplit(".", 1)[-1])
        lines = [f"{self.method} subspace, {len(self.bases)} bases, {self.num_bytes() / 2**20:.2f} MiB"]
        for key, basis in self.bases.items():
            energy = self.energy_kept(key)
            kept = f", energy kept {energy:.2%}" if energy is not None else ""
            members = ", ".join(sorted(set(users[key])))
            lines.append(f"  {key}: rank {basis.shape[1]}/{basis.shape[0]}{kept} ({members})")
        return "\n".join(lines)
