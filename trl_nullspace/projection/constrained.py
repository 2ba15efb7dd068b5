"""One constrained parameter: its matrix view, basis and anchor, and the projections on it.

Every constrained parameter is seen as a matrix `M` whose *rows* must stay orthogonal to an
orthonormal basis `U` (n×k):
  - activation method: `M` is a Linear weight (or a LoRA `A`), d_out×d_in, and `U` spans the
    layer's reference inputs, so `ΔM U = 0` means unchanged outputs on the reference data;
  - gradient method: `M` is the flattened parameter, 1×numel, and `U` spans reference gradients.

Two ways to apply it (`nullspace_projection_target`):
  - `"gradient"`: `G ← G − (G U) Uᵀ` before the optimizer step. Adam's per-coordinate scaling and
    weight decay then put components back into span(U): the guarantee does not survive AdamW.
  - `"update"`: after the optimizer step, `M ← M − (M U − A) Uᵀ` with the anchor `A = M₀ U` taken
    when training starts. This is the projection of the cumulative update `M − M₀` onto the null
    space, whatever the optimizer did, and needs only `A` (d_out×k), not a copy of `M₀`. For a
    LoRA `A` matrix the anchor is zero, so `B A U = 0` holds for any `B`.

With step snapshots (`nullspace_step_snapshot`) no anchor is kept: the weights are copied just
before the optimizer step (`take_previous`), and after it `M ← M − ((M − S) U) Uᵀ` projects that
step's change alone and frees the copy `S`. `M U = S U` then holds step by step, so `M U = M₀ U`
up to one fp32 round-off per step, and nothing is held between steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from trl_nullspace.projection.anchors import Anchor
from trl_nullspace.projection.basis import SharedBasis
from trl_nullspace.projection.placements import host_copy


@dataclass
class ProjectionStats:
    """Squared Frobenius norms of `(G U) Uᵀ` and `G` per constrained parameter.

    Kept as device tensors and read in one transfer, not one synchronisation per parameter.
    """

    removed_sq: dict[str, torch.Tensor] = field(default_factory=dict)
    total_sq: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, name: str, removed_sq: torch.Tensor, total_sq: torch.Tensor) -> None:
        self.removed_sq[name] = removed_sq
        self.total_sq[name] = total_sq

    @property
    def removed_fraction(self) -> float:
        """Fraction of the norm removed over all parameters: ‖(G U) Uᵀ‖ / ‖G‖."""
        if not self.total_sq:
            return 0.0
        removed, total = (
            torch.stack(list(self.removed_sq.values())).sum(),
            torch.stack(list(self.total_sq.values())).sum(),
        )
        return float((removed / total).sqrt()) if float(total) > 0 else 0.0

    def per_parameter_fractions(self) -> dict[str, float]:
        """The same fraction for each parameter."""
        if not self.total_sq:
            return {}
        removed = torch.stack(list(self.removed_sq.values()))
        total = torch.stack(list(self.total_sq.values()))
        fractions = torch.where(total > 0, (removed / total.clamp_min(1e-30)).sqrt(), torch.zeros_like(total))
        return dict(zip(self.total_sq, fractions.tolist(), strict=True))


def full_shape(parameter: torch.Tensor) -> tuple[int, ...]:
    """The parameter's shape, also when DeepSpeed ZeRO-3 has partitioned it (its `ds_shape`)."""
    return tuple(getattr(parameter, "ds_shape", parameter.shape))


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """‖(t₁, t₂, …)‖₂ over all tensors, in one fused multi-tensor kernel (as gradient clipping does)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


class ConstrainedParameter:
    """One trainable parameter, its matrix view, basis and (for `update` projection) anchor."""

    def __init__(
        self,
        name: str,
        parameter: nn.Parameter,
        basis: torch.Tensor | SharedBasis,
        flat: bool,
        zero_anchor: bool,
        compute_dtype: torch.dtype = torch.float32,
        transposed: bool = False,
        expert: int | None = None,
        parameter_name: str | None = None,
        kind: str = "dense",
    ):
        shape = full_shape(parameter)
        if expert is not None:
            shape = shape[1:]
        if len(shape) != 2 and not flat:
            raise ValueError(f"{name} is not a matrix (shape {shape}).")
        # The matrix the basis acts on from the right is (out × in); a `Conv1D` weight stores its
        # transpose, so it is used through a transposed view, and one expert of a fused 3-D weight
        # through its slice (in-place updates write through both).
        self.transposed = transposed
        self.expert = expert
        self.parameter_name = parameter_name or name  # differs for an expert's slice: `<parameter>[e]`
        self.matrix_shape: tuple[int, int] = (
            (1, math.prod(shape)) if flat else (shape[1], shape[0]) if transposed else (shape[0], shape[1])
        )
        self.shared = basis if isinstance(basis, SharedBasis) else SharedBasis(basis)
        rows_dim = self.matrix_shape[1]
        if self.shared.dimension != rows_dim:
            raise ValueError(
                f"Subspace basis for {name} has dimension {self.shared.dimension} but the parameter needs "
                f"{rows_dim}: the subspace was estimated for a different model."
            )
        self.name = name
        self.kind = kind  # the registered kind that bound it (`projection.kinds`)
        self.parameter = parameter
        self.device = parameter.device  # where the weights (or their master copies) are stepped
        # The basis as the per-step products use it: fp32 by default (exact); bf16 trades the
        # preservation's precision (to bf16 round-off, not accumulating) for faster products.
        self.compute_dtype = compute_dtype
        self.flat = flat
        self.zero_anchor = zero_anchor
        # Project each step's change from a snapshot taken before it, keeping no anchor (module docstring).
        self.step_snapshots = False
        self.anchor_state: Anchor | None = None  # `A = M₀ U`, for the `update` projection
        # With a complement basis instead: the weights (or a shard's rows) as last projected.
        self.previous_state: Anchor | None = None

    @property
    def basis(self) -> torch.Tensor:
        """The whole fp32 basis `U` where the weights are stepped (shared with the other weights reading it)."""
        if self.shared.complement:
            raise RuntimeError(f"{self.name} keeps the complement of its basis, not U (nullspace_basis_storage).")
        return self.shared.whole(self.device)

    @property
    def has_anchor(self) -> bool:
        return self.anchor_state is not None

    @property
    def anchor(self) -> torch.Tensor | None:
        """The whole anchor `A` (d_out×k), or None where none is recorded."""
        if self.anchor_state is None:
            return None
        return self.anchor_state.rows(0, self.anchor_state.total_rows)

    def set_anchor(self, anchor: torch.Tensor | None) -> None:
        """Record `anchor` (fp32, kept where the basis is: with the weights, or in host memory)."""
        if anchor is None:
            self.anchor_state = None
            return
        blocks = self.shared.split(anchor.to(device=self.device, dtype=torch.float32))
        self.anchor_state = Anchor(blocks, self.shared.offloaded)

    def keep_anchor_rows(self, first: int, count: int) -> None:
        """Keep only the anchor rows a sharded backend's rank projects (`Anchor.keep_rows`)."""
        if self.anchor_state is not None:
            self.anchor_state.keep_rows(first, count)

    def take_previous(self, matrix: torch.Tensor | None = None, first_row: int = 0) -> None:
        """With a complement basis or step snapshots: record the weights now (or the rows `matrix` of
        them from `first_row` on, a shard's), the point the next `update` projection keeps the change from."""
        if not self.shared.complement and not self.step_snapshots:
            return
        matrix = self.matrix_view(self.parameter.data) if matrix is None else matrix
        keep = host_copy if self.shared.offloaded else torch.Tensor.clone
        self.previous_state = Anchor([keep(matrix.detach())], self.shared.offloaded, first_row, self.matrix_shape[0])

    def move_to(self, device: torch.device) -> None:
        """Move basis and anchor to where the weights are stepped (DeepSpeed and FSDP place the model
        on the accelerator only when they shard it, after the subspace was bound)."""
        self.device = torch.device(device)
        self.shared.move(self.device)
        for state in (self.anchor_state, self.previous_state):
            if state is not None:
                state.move(self.device)

    @property
    def rank(self) -> int:
        return self.shared.rank

    @property
    def dimension(self) -> int:
        return self.shared.dimension

    def matrix_view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The (out × in) view of a weight-shaped tensor, sharing its storage."""
        if self.expert is not None:
            tensor = tensor[self.expert]
        return tensor.view(1, -1) if self.flat else tensor.T if self.transposed else tensor

    @torch.no_grad()
    def remove_from_gradient(self, apply: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared norms of `G U` and `G`; with `apply`, also `G ← G − (G U) Uᵀ` in place.

        Always in fp32, whatever `nullspace_projection_dtype`: Adam divides by the gradient's own
        scale per coordinate, so bf16 round-off left in span(U) would come back amplified (measured
        on the tiny model: 0.19 reference drift with bf16 here, 4e-3 with it only in the update).
        """
        gradient = self.matrix_view(self.parameter.grad)
        # One fp32 view for every block (a copy only for low-precision gradients): the blocks are
        # orthogonal, so `G U_b` is the same before and after another block is removed.
        as_float = gradient.float()
        total_sq = as_float.square().sum()
        if self.shared.complement:
            kept = self._in_complement(as_float)
            if apply:
                gradient.copy_(kept)
            return (total_sq - kept.square().sum()).clamp_min(0), total_sq
        removed_sq = torch.zeros((), dtype=torch.float32, device=gradient.device)
        for block in self.shared.blocks(gradient.device, torch.float32):
            coefficients = as_float @ block
            removed_sq += coefficients.square().sum()
            if apply:
                gradient.sub_((coefficients @ block.T).to(gradient.dtype))
        return removed_sq, total_sq

    @torch.no_grad()
    def projected(self, gradient: torch.Tensor) -> torch.Tensor:
        """`G − (G U) Uᵀ` of one whole gradient, as a new tensor of its dtype (a tensor-hook's result).

        Used where the trainer never sees the synchronised gradient (DeepSpeed reduces it in its
        own hooks and steps inside backward): each micro-batch's local gradient is projected as it
        is produced. Projection is linear, so projecting every rank's every micro-batch equals
        projecting their reduced sum. The product runs in fp32 on the gradient's device.
        """
        if self.expert is not None:
            result = gradient.clone()
            view = self.matrix_view(result)  # this expert's (out × in) matrix inside the copy
            view.copy_(self._without_subspace(view.float()))
            return result
        matrix = (gradient.T if self.transposed else gradient.reshape(self.matrix_shape)).float()
        projected = self._without_subspace(matrix)
        return (projected.T if self.transposed else projected).reshape(gradient.shape).to(gradient.dtype)

    def _without_subspace(self, matrix: torch.Tensor) -> torch.Tensor:
        """`matrix − (matrix U) Uᵀ` in fp32, as a new tensor (block by block if offloaded)."""
        if self.shared.complement:
            return self._in_complement(matrix)
        result = matrix.clone()
        for block in self.shared.blocks(matrix.device, torch.float32):
            result.addmm_(matrix @ block, block.T, alpha=-1)
        return result

    def _in_complement(self, matrix: torch.Tensor) -> torch.Tensor:
        """`matrix N Nᵀ` in fp32 (= `matrix − matrix U Uᵀ`), as a new tensor, from a complement basis."""
        as_float = matrix.float()  # once, not per block: a copy for low-precision matrices
        kept = torch.zeros(matrix.shape, dtype=torch.float32, device=matrix.device)
        for block in self.shared.blocks(matrix.device, torch.float32):
            kept.addmm_(as_float @ block, block.T)
        return kept

    @torch.no_grad()
    def reset_anchor(self) -> None:
        """Record `A = M U` now (zero for LoRA `A`, which is first moved into the null space). With a
        complement basis there is no anchor: the weights are recorded before training instead
        (`take_previous`), and a LoRA `A` is moved into the null space here."""
        if self.shared.complement:
            if self.zero_anchor:
                matrix = self.matrix_view(self.parameter.data)
                matrix.copy_(self._in_complement(matrix))
            return
        if self.zero_anchor:
            self.anchor_state = None
            self.enforce_anchor()
            return
        if self.step_snapshots:
            self.anchor_state = None
            return
        matrix = self.matrix_view(self.parameter.data)
        keep = host_copy if self.shared.offloaded else torch.Tensor.contiguous
        blocks = [
            keep((matrix.to(block.dtype) @ block).float())
            for block in self.shared.blocks(matrix.device, self.compute_dtype)
        ]
        self.anchor_state = Anchor(blocks, self.shared.offloaded)

    @torch.no_grad()
    def enforce_anchor(self) -> torch.Tensor:
        """`M ← M − (M U − A) Uᵀ` on the whole weight; returns `M U − A` (or its norm, see `enforce_on`)."""
        return self.enforce_on(self.matrix_view(self.parameter.data))

    @torch.no_grad()
    def enforce_on(self, matrix: torch.Tensor, rows: slice | None = None, anchored: bool = True) -> torch.Tensor:
        """`matrix ← matrix − (matrix U − A) Uᵀ` in place, for the whole weight or for the block `rows`
        of its rows (FSDP2's shards) with the matching anchor rows; `anchored=False` uses `A = 0`
        (a gradient). Returns `matrix U − A`, or, when a basis is applied block by block (offloaded, or
        split and gathered by block), its norm: a tensor whose 2-norm is the residual's either way.

        For fp32 weights and products each block is two fused kernels (`addmm`), because per-step
        cost on a GPU is dominated by kernel launches at a few hundred parameters, not by the FLOPs.
        """
        if self.shared.complement:
            return self._enforce_with_complement(matrix, rows, anchored)
        if anchored and self.step_snapshots:
            if self.previous_state is not None:
                return self._enforce_step(matrix, rows)
            if not self.zero_anchor:  # a LoRA `A` is projected whole (its anchor is zero); nothing else may be
                raise RuntimeError(f"{self.name}: no snapshot of the weights before the step (take_previous).")
        anchors = self.anchor_state if anchored else None
        norms = []
        for index, block in enumerate(self.shared.blocks(matrix.device, self.compute_dtype)):
            anchor = None
            if anchors is not None:
                anchor = anchors.block(index, rows).to(matrix.device, non_blocking=True)
            residual = _enforce_block(matrix, block, anchor)
            if len(self.shared.columns) == 1:  # one block: the residual itself
                return residual
            norms.append(torch.linalg.vector_norm(residual))
        return _combined_norm(norms, matrix.device)

    def _enforce_step(self, matrix: torch.Tensor, rows: slice | None) -> torch.Tensor:
        """`M ← M − ((M − S) U) Uᵀ` in place, `S` the snapshot taken before the step (`take_previous`; the
        rows `rows` of it for a shard): the step's change keeps only its part outside span(U), so `M U = S U`.
        Frees the snapshot; returns the norm of `(M − S) U`. Block by block where offloaded (exact: the
        blocks are orthonormal, and each reads the step's change, which the others leave unchanged in it)."""
        held = self.previous_state.block(0, rows)
        change = matrix.float() - held.to(matrix.device, non_blocking=True).float()
        norms = []
        for block in self.shared.blocks(matrix.device, self.compute_dtype):
            residual = change.to(block.dtype) @ block
            _remove_along(matrix, residual, block)
            norms.append(torch.linalg.vector_norm(residual.float()))
        self.previous_state = None
        return _combined_norm(norms, matrix.device)

    def _enforce_with_complement(self, matrix: torch.Tensor, rows: slice | None, anchored: bool) -> torch.Tensor:
        """`M ← P + (M − P) N Nᵀ` in place, `P` the weights as last projected (`take_previous`; zero
        for a gradient, `anchored=False`, and for a LoRA `A` trained without tracking): the change
        since then keeps only its part outside span(U), so `M U = P U = M₀ U`. Records `M` as the
        next `P` and returns the norm of what was removed, `‖(M − P) U Uᵀ‖`."""
        previous = None
        if anchored and self.previous_state is not None:
            held = self.previous_state.block(0, rows)
            previous = held.to(matrix.device, non_blocking=True)
        elif anchored and not self.zero_anchor:
            raise RuntimeError(f"{self.name}: no weights recorded before the step (take_previous was not called).")
        change = matrix.float() if previous is None else matrix.float() - previous.float()
        kept = self._in_complement(change)
        removed_sq = (change.square().sum() - kept.square().sum()).clamp_min(0)
        if previous is None:
            matrix.copy_(kept)
        else:
            matrix.copy_(previous.float() + kept)
            if self.step_snapshots:
                self.previous_state = None  # the next step's snapshot is taken before it
            else:
                held.copy_(matrix, non_blocking=True)
        return removed_sq.sqrt()


def _enforce_block(matrix: torch.Tensor, block: torch.Tensor, anchor: torch.Tensor | None) -> torch.Tensor:
    """`matrix ← matrix − (matrix B − anchor) Bᵀ` for one block `B` of orthonormal columns; returns
    `matrix B − anchor` in fp32 (products in the block's dtype)."""
    if matrix.dtype == torch.float32 and block.dtype == torch.float32:
        residual = matrix @ block if anchor is None else torch.addmm(anchor, matrix, block, beta=-1)
    else:
        residual = (matrix.to(block.dtype) @ block).float()
        if anchor is not None:
            residual -= anchor
    _remove_along(matrix, residual, block)
    return residual


def _remove_along(matrix: torch.Tensor, coefficients: torch.Tensor, block: torch.Tensor) -> None:
    """`matrix ← matrix − coefficients Bᵀ` in place: one fused kernel for fp32, else the product in the
    block's dtype."""
    if matrix.dtype == torch.float32 and block.dtype == torch.float32:
        matrix.addmm_(coefficients, block.T, alpha=-1)
    else:
        matrix.sub_((coefficients.to(block.dtype) @ block.T).to(matrix.dtype))


def _combined_norm(norms: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The 2-norm of the blocks' norms (zero where nothing is protected)."""
    if not norms:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.linalg.vector_norm(torch.stack(norms))


def diverged_step_error(names: list[str]) -> FloatingPointError:
    """The error for weights, or gradients projected inside DeepSpeed's step, that are NaN or inf at an
    optimizer step (sharded backends' check)."""
    where = names[:3] if names else "another process's share of the weights"
    return FloatingPointError(
        f"NaN or inf weights or gradients at the optimizer step in {where}: the step diverged. Lower the learning "
        "rate or check the batch; checkpoints saved before this step are intact."
    )
