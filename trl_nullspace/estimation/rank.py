"""Choosing how many eigen-directions of a reference statistic count as "capability"."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class RankSelection:
    """Keep the smallest number of top directions that satisfies the rule.

    `energy`: the kept eigenvalues sum to at least this fraction of the total.
    `eigenvalue_threshold`: keep every eigenvalue above this fraction of the largest.
    `max_rank`: cap on the result of either rule.
    """

    energy: float | None = None
    eigenvalue_threshold: float | None = None
    max_rank: int | None = None

    def __post_init__(self) -> None:
        if (self.energy is None) == (self.eigenvalue_threshold is None):
            raise ValueError("RankSelection needs exactly one of energy or eigenvalue_threshold.")

    def rank(self, eigenvalues: torch.Tensor) -> int:
        """Rank to keep for `eigenvalues` sorted in descending order (negative round-off counts as 0)."""
        if not torch.isfinite(eigenvalues).all():
            raise FloatingPointError("Reference statistics contain NaN or inf: the reference pass overflowed.")
        values = eigenvalues.double().clamp_min(0.0)
        largest = values[0].item() if values.numel() else 0.0
        if largest == 0.0:
            return 0
        if self.energy is not None:
            cumulative = torch.cumsum(values, 0) / values.sum()
            kept = (
                int(
                    torch.searchsorted(
                        cumulative, torch.tensor(self.energy, dtype=cumulative.dtype, device=cumulative.device)
                    ).item()
                )
                + 1
            )
        else:
            kept = int((values > self.eigenvalue_threshold * largest).sum().item())
        kept = min(kept, values.numel())
        return kept if self.max_rank is None else min(kept, self.max_rank)

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)
