"""NSPO-style estimation: the span of each distinct Linear input on the reference data."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from trl_nullspace.estimation.exemption import Exemption, energy_share, exempt_direction, harm_key
from trl_nullspace.estimation.modes import evaluating
from trl_nullspace.estimation.rank import RankSelection
from trl_nullspace.estimation.reference import ReferenceBatch
from trl_nullspace.estimation.subspace import CapabilitySubspace
from trl_nullspace.projection.constrained import full_shape
from trl_nullspace.projection.experts import GATE_UP, hidden_size, is_fused_experts, routed_inputs, slice_name
from trl_nullspace.projection.targets import decoder_layer_of, is_transposed_linear


class InputCovarianceCollector:
    """Forward pre-hooks that accumulate `Xᵀ X` (fp64, padding masked out) per distinct input.

    fp64 because the smallest real eigenvalues of a layer input's covariance sit near fp32's
    round-off floor (~1e-7 of the largest): in fp32 a strict threshold cannot tell them from
    noise, and the directions it drops are ones the reference data does use.

    Linears fed the same tensor one after another (q/k/v on the normed hidden state, gate/up in
    an MLP) form one group: the statistic is accumulated once, by the group's first module, and
    every member shares the resulting basis. Only the previous hook's input is held, so no layer
    input outlives its use.

    With `normalize_tokens`, every token's input is scaled to unit length first, so each token
    weighs the same. Real models have "massive activations" (one token, usually the first, with
    inputs thousands of times larger than the rest); in the raw statistic that one direction holds
    nearly all the energy, and an energy rule then protects it alone. The span, and so exactness
    under a strict threshold, is the same either way.
    """

    def __init__(
        self,
        linears: dict[str, nn.Module],
        normalize_tokens: bool = False,
        experts: dict[str, nn.Module] | None = None,
        second_moments: bool = True,
    ):
        self.linears = linears
        self.experts = experts or {}  # `<experts>.gate_up_proj`/`.down_proj` → the fused experts module
        self.normalize_tokens = normalize_tokens
        # False: only the inputs' sums (class means for `exemption`), not the d×d statistics.
        self.second_moments = second_moments
        self.group_of: dict[str, str] = {}
        self.covariances: dict[str, torch.Tensor] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.token_counts: dict[str, int] = {}
        self._mask: torch.Tensor | None = None
        self._last_input: torch.Tensor | None = None
        self._last_leader: str | None = None
        self._counting = True

    def _hook(self, name: str):
        def accumulate(module: nn.Module, args: tuple) -> None:
            inputs = args[0]
            if inputs is self._last_input:
                self._assign(name, self._last_leader)
                return
            self._last_input, self._last_leader = inputs, name
            self._assign(name, name)
            self._accumulate(name, inputs[self._token_mask(name, inputs)])

        return accumulate

    def _token_mask(self, name: str, inputs: torch.Tensor) -> torch.Tensor:
        """Which of a layer input's rows are real tokens, from the attention mask (batch, sequence).

        Layouts: (batch, sequence, features); (batch·sequence, features), OPT's MLP and Qwen2-MoE's
        shared expert; and, for DeepSeek's latent attention, (batch, heads…, sequence, features)
        (`kv_b_proj`) or (batch, sequence, groups…, features) (V4's `o_a_proj`), where every head's
        or group's row is an input of the same weight. If both of the last two fit (a head count
        equal to the sequence length), padding rows cannot be told apart and all rows are kept:
        protecting more inputs than the reference's never loosens the constraint.
        """
        batch, length = self._mask.shape
        if inputs.shape[:-1] == self._mask.shape:
            return self._mask
        if inputs.dim() == 2 and inputs.shape[0] == self._mask.numel():
            return self._mask.reshape(-1)
        if inputs.dim() > 3 and inputs.shape[0] == batch:
            leading, trailing = inputs.shape[1] == length, inputs.shape[-2] == length
            if leading != trailing:
                shape = [batch] + [1] * (inputs.dim() - 2)
                shape[1 if leading else -1] = length
                return self._mask.reshape(shape).expand(inputs.shape[:-1])
            if leading:
                return torch.ones(inputs.shape[:-1], dtype=torch.bool, device=inputs.device)
        raise ValueError(
            f"Input of {name} has shape {tuple(inputs.shape)}; expected (batch, sequence, features), "
            "(batch·sequence, features), or (batch, sequence or heads…, features) matching the attention mask "
            f"{tuple(self._mask.shape)} so padding can be masked out."
        )

    def _accumulate(self, name: str, tokens: torch.Tensor) -> None:
        if not self._counting:  # a forward run only to keep step with the other processes
            return
        tokens = tokens.double()
        if self.normalize_tokens:
            tokens = tokens / tokens.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        if name in self.sums:
            self.sums[name] += tokens.sum(0)
        else:
            self.sums[name] = tokens.sum(0)
        if self.second_moments:
            covariance = tokens.T @ tokens
            if name in self.covariances:
                self.covariances[name] += covariance
            else:
                self.covariances[name] = covariance
        self.token_counts[name] = self.token_counts.get(name, 0) + tokens.shape[0]

    def sum_over_processes(self) -> None:
        """Add up every process' statistics and token counts (all processes collected the same
        targets, each from its own share of the data), so all hold the whole data's, bit for bit."""
        for name in sorted(self.covariances):
            dist.all_reduce(self.covariances[name])
        for name in sorted(self.sums):
            dist.all_reduce(self.sums[name])
        names = sorted(self.token_counts)
        if names:
            device = self.sums[names[0]].device  # where the statistics are: the collective's device
            counts = torch.tensor([self.token_counts[name] for name in names], dtype=torch.int64, device=device)
            dist.all_reduce(counts)
            self.token_counts = dict(zip(names, counts.tolist(), strict=True))

    def _experts_hook(self, weights: list[str]):
        """Per expert, the statistics of the tokens routed to it (`trl_nullspace.projection.experts`); every
        expert gets an entry, an empty one if no reference token reaches it."""

        def accumulate(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden_states = args[0] if args else kwargs["hidden_states"]
            top_k_index = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
            mask = self._mask.reshape(-1)
            if hidden_states.dim() != 2 or hidden_states.shape[0] != mask.numel():
                raise ValueError(
                    f"The experts {weights[0].rsplit('.', 1)[0]} got inputs of shape {tuple(hidden_states.shape)}; "
                    f"expected (batch·sequence, features) matching the attention mask {tuple(self._mask.shape)}."
                )
            for expert, inputs in routed_inputs(module, hidden_states, top_k_index, mask).items():
                for weight in weights:
                    key = slice_name(weight, expert)
                    self._assign(key, key)
                    self._accumulate(key, inputs[0] if weight.endswith(GATE_UP) else inputs[1])

        return accumulate

    def _assign(self, name: str, leader: str) -> None:
        previous = self.group_of.setdefault(name, leader)
        if previous != leader:
            raise RuntimeError(
                f"{name} shared its input with {previous} in one forward pass and with {leader} in another; "
                "the model's call order is not stable, so inputs cannot be grouped."
            )

    @torch.no_grad()
    def collect(
        self,
        model: nn.Module,
        batches: list[ReferenceBatch],
        show_progress: bool,
        description: str = "nullspace: reference inputs",
        across_processes: bool = False,
        layer_order: LayerOrder | None = None,
    ) -> None:
        """One forward pass per batch, each ended after the last decoder layer holding a target
        (`layer_order`, learned in this collection's first forward if not given).

        With `across_processes` (every process calls this with the same `batches`), this process
        reads `batches[rank::world]` and the statistics are summed over the processes. Every process
        runs as many forward passes as the busiest one, the extra one re-reading its last batch
        without counting it: under ZeRO-3 each forward gathers the layers collectively.
        """
        forwards = len(batches)
        if across_processes:
            world, rank = dist.get_world_size(), dist.get_rank()
            if len(batches) < world:
                raise ValueError(f"{len(batches)} reference batches cannot be shared by {world} processes.")
            forwards = math.ceil(len(batches) / world)
            batches = batches[rank::world]
        device = next(model.parameters()).device
        handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in self.linears.items()]
        weights_of: dict[nn.Module, list[str]] = {}
        for weight, module in self.experts.items():
            weights_of.setdefault(module, []).append(weight)
        handles += [
            module.register_forward_pre_hook(self._experts_hook(weights), with_kwargs=True)
            for module, weights in weights_of.items()
        ]
        targets = [*self.linears, *self.experts]
        end = _EndAfterTargets(layer_order or LayerOrder(model, targets), targets)
        try:
            for index in tqdm(range(forwards), desc=description, disable=not show_progress):
                self._counting = index < len(batches)
                batch = batches[min(index, len(batches) - 1)].to(device)
                self._mask = batch.attention_mask.bool()
                try:
                    model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
                except _TargetsCollected:
                    pass
                end.forward_done()
                self._last_input = self._last_leader = None
        finally:
            for handle in handles:
                handle.remove()
            end.remove()
            self._mask = None
        if across_processes:
            self._agree_on_the_targets_seen(device)
        self._check_every_target_was_called(model)
        if across_processes:
            self.sum_over_processes()

    def _agree_on_the_targets_seen(self, device: torch.device) -> None:
        """Make every process hold the targets any process saw: a module that the tokens' routing
        never reaches on one process' share (an expert kept as its own Linear) still has statistics
        there, empty, so that all processes check the same targets, raise together if one was never
        called anywhere, and all-reduce the same statistics (a process missing one would leave the
        others waiting in the collective)."""
        everyone: list[dict[str, str] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, self.group_of)
        for group_of in everyone:
            for name, leader in group_of.items():
                self._assign(name, leader)
        for leader in set(self.group_of.values()) - set(self.sums):
            size = linear_input_size(self.linears[leader])
            self.sums[leader] = torch.zeros(size, dtype=torch.float64, device=device)
            if self.second_moments:
                self.covariances[leader] = torch.zeros(size, size, dtype=torch.float64, device=device)
            self.token_counts[leader] = 0

    def _check_every_target_was_called(self, model: nn.Module) -> None:
        expected = set(self.linears) | {
            slice_name(weight, expert)
            for weight, module in self.experts.items()
            for expert in range(getattr(module, GATE_UP).shape[0])
        }
        missing = sorted(expected - set(self.group_of))
        if missing:
            hint = ""
            if "forward" in vars(model):
                hint = (
                    " The model's `forward` is an attribute of this instance, not its class: TRL's SFTTrainer "
                    "patches it with a closure over the original model, so a deep copy of an SFT-trained model "
                    "keeps running the original's layers. Run `del model.forward` on the trained model before "
                    "copying it (e.g. for the next stage or DPO's ref_model)."
                )
            raise RuntimeError(f"Target layers {missing[:5]} were never called on the reference data.{hint}")


class _TargetsCollected(Exception):
    """Raised to end a forward pass once every target's input has been read."""


class LayerOrder:
    """The order in which the decoder layers holding targets finish a forward pass. Learned in an
    estimate's first forward (run whole), then used by every pass of it to end each forward after
    the pass' own last layer: the layers after it, and the LM head (a fifth of SmolLM2-135M's
    forward FLOPs), feed nothing to its statistics, so pass p of P runs about p/P of the layers.

    Decoder layers run in every forward, so every process learns the same order and ends at the
    same layer (ZeRO-3 gathers layers collectively). Forwards stay whole (`usable` false) when a
    target sits outside a module of its own, when a layer runs twice in one forward (weights shared
    across depth), or when `enabled` is false (to measure what ending early saves).
    """

    def __init__(self, model: nn.Module, targets: list[str], enabled: bool = True):
        modules = dict(model.named_modules())
        names = {_unit(name) for name in targets}
        self.usable = enabled and names <= set(modules)
        self.layers: dict[str, nn.Module] = {name: modules[name] for name in names} if self.usable else {}
        self.finished: list[nn.Module] | None = None  # in the order they finished, once learned


class _EndAfterTargets:
    """Ends one collection's forwards after the last of its targets' layers in `order` (which its
    first forward learns, if no earlier collection has)."""

    def __init__(self, order: LayerOrder, targets: list[str]):
        self.order = order
        self.layers = {order.layers[_unit(name)] for name in targets} if order.usable else set()
        self._recorded: list[nn.Module] = []
        self._handles = []
        if order.usable and order.finished is None:
            self._handles = [layer.register_forward_hook(self._record) for layer in order.layers.values()]
        elif order.usable:
            self._arm()

    def _record(self, module: nn.Module, args: tuple, output: object) -> None:
        self._recorded.append(module)

    @staticmethod
    def _end(module: nn.Module, args: tuple, output: object) -> None:
        raise _TargetsCollected

    def _arm(self) -> None:
        position = {layer: index for index, layer in enumerate(self.order.finished)}
        if not self.layers <= set(position):  # a target layer did not run: the missing-target check says so
            return
        last = max(self.layers, key=position.__getitem__)
        self._handles.append(last.register_forward_hook(self._end))

    def forward_done(self) -> None:
        """After each forward: the first one's record becomes the order (if no earlier one's did)."""
        if not self.order.usable or self.order.finished is not None:
            return
        self.remove()
        if len(set(self._recorded)) != len(self._recorded):
            self.order.usable = False
            return
        self.order.finished = self._recorded
        self._arm()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def top_eigenvectors(covariance: torch.Tensor, selection: RankSelection) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal top eigenvectors (fp32) of a symmetric PSD matrix (`eigh`, not `svd`: ~11× faster)."""
    if not torch.isfinite(covariance).all():
        raise FloatingPointError("The reference input covariance contains NaN or inf.")
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    rank = selection.rank(eigenvalues)
    return eigenvectors[:, :rank].float().contiguous(), eigenvalues.float()


def contrastive_basis(
    reference: torch.Tensor, contrast: torch.Tensor, selection: RankSelection
) -> tuple[torch.Tensor, float]:
    """The protected basis that leaves free the directions the contrast data needs most.

    The energy rule frees the directions of least reference energy, whatever the safety update
    needs. Here the free space F is grown, in order of the generalised eigenvalues of
    `contrast v = λ reference v` (contrast energy per unit of reference energy), for as long as
    the reference energy in F stays within the same budget, 1 − `selection.energy`. So the same
    share of reference energy is left unprotected, spent where the safety data lives.

    Returns the orthonormal complement of F (fp32, d×k) and the reference energy it keeps.
    """
    if selection.energy is None or selection.max_rank is not None:
        raise ValueError("The contrastive subspace chooses its rank by energy only (no threshold, no max rank).")
    for name, matrix in (("reference", reference), ("contrast", contrast)):
        if not torch.isfinite(matrix).all():
            raise FloatingPointError(f"The {name} input covariance contains NaN or inf.")
        if matrix.trace() <= 0:
            raise ValueError(f"The {name} data gave this layer no input: its covariance is zero.")
    dimension = reference.shape[0]
    identity = torch.eye(dimension, dtype=reference.dtype, device=reference.device)
    reference = reference / reference.trace()
    contrast = contrast / contrast.trace()
    # A tiny ridge makes the reference statistic invertible; directions it never saw then rank
    # by their contrast energy alone, and cost (almost) nothing of the budget.
    cholesky = torch.linalg.cholesky(reference + 1e-9 * identity)
    whitened = torch.linalg.solve_triangular(
        cholesky, torch.linalg.solve_triangular(cholesky, contrast, upper=False).T, upper=False
    )
    _, vectors = torch.linalg.eigh((whitened + whitened.T) / 2)
    directions = torch.linalg.solve_triangular(cholesky.T, vectors.flip(1), upper=True)
    ordered = torch.linalg.qr(directions).Q  # nested spans, most contrast-heavy first
    leaked = torch.cumsum(((reference @ ordered) * ordered).sum(0), 0)
    free = int((leaked <= 1.0 - selection.energy + 1e-12).sum().item())
    kept = 1.0 - (leaked[free - 1].item() if free else 0.0)
    return ordered[:, free:].float().contiguous(), kept


FP64_BYTES = 8


def _unit(name: str) -> str:
    """The decoder layer a target belongs to (`decoder_layer_of`), or the target itself outside
    the layers: the targets of one layer are always collected in the same pass, so the inputs they
    share are grouped as in a single pass."""
    return decoder_layer_of(name) or name


def statistic_bytes(name: str, module: nn.Module) -> int:
    """An upper bound of the fp64 statistic a target needs (as if it shared its input with no other
    target): d_in² values, per expert for a fused experts weight."""
    if is_fused_experts(module):
        gate_up = getattr(module, GATE_UP)
        shape = full_shape(gate_up)
        hidden = hidden_size(module)
        size = hidden if name.endswith(GATE_UP) else math.prod(shape[1:]) // hidden // 2
        return shape[0] * size * size * FP64_BYTES
    return linear_input_size(module) ** 2 * FP64_BYTES


def linear_input_size(module: nn.Module) -> int:
    """A Linear's (or transformers' transposed Conv1D's) input size, also under ZeRO-3 partitioning."""
    shape = full_shape(module.weight)
    return shape[0] if is_transposed_linear(module) else shape[1]


def plan_passes(
    linears: dict[str, nn.Module], experts: dict[str, nn.Module], budget_bytes: int | None
) -> list[tuple[dict[str, nn.Module], dict[str, nn.Module]]]:
    """Split the targets into passes over the reference data whose statistics fit `budget_bytes`
    together: whole decoder layers, in model order, as many per pass as fit (a layer larger than
    the budget alone gets a pass of its own). `None`: one pass."""
    if budget_bytes is None:
        return [(linears, experts)]
    units: dict[str, tuple[dict[str, nn.Module], dict[str, nn.Module], int]] = {}
    for targets, index in ((linears, 0), (experts, 1)):
        for name, module in targets.items():
            unit = units.setdefault(_unit(name), ({}, {}, 0))
            unit[index][name] = module
            units[_unit(name)] = (unit[0], unit[1], unit[2] + statistic_bytes(name, module))
    passes: list[tuple[dict[str, nn.Module], dict[str, nn.Module]]] = []
    held = budget_bytes + 1  # start a new pass first
    for unit_linears, unit_experts, size in units.values():
        if held + size > budget_bytes:
            passes.append(({}, {}))
            held = 0
        passes[-1][0].update(unit_linears)
        passes[-1][1].update(unit_experts)
        held += size
    return passes


def collect_in_passes(
    model: nn.Module,
    batches: list[ReferenceBatch],
    linears: dict[str, nn.Module],
    normalize_tokens: bool,
    experts: dict[str, nn.Module] | None,
    budget_bytes: int | None,
    show_progress: bool,
    description: str,
    across_processes: bool = False,
    layer_order: LayerOrder | None = None,
) -> Iterator[InputCovarianceCollector]:
    """One collector per pass of `plan_passes`, each filled by a forward pass over `batches`; the
    caller uses a pass' statistics before the next one is collected, so at most one pass' are held.
    With `across_processes`, each process reads its share of `batches` and the statistics are summed."""
    passes = plan_passes(linears, experts or {}, budget_bytes)
    layer_order = layer_order or LayerOrder(model, [*linears, *(experts or {})])
    for index, (pass_linears, pass_experts) in enumerate(passes):
        collector = InputCovarianceCollector(pass_linears, normalize_tokens, pass_experts)
        label = description if len(passes) == 1 else f"{description} (pass {index + 1}/{len(passes)})"
        collector.collect(model, batches, show_progress, label, across_processes, layer_order)
        yield collector
        collector.covariances.clear()  # the caller is done with this pass: free its statistics first


def _add_bases(
    collector: InputCovarianceCollector,
    contrast: InputCovarianceCollector | None,
    selection: RankSelection,
    bases: dict[str, torch.Tensor],
    eigenvalues: dict[str, torch.Tensor],
    energy: dict[str, float],
) -> None:
    """The bases of one pass' statistics, added to `bases` (and `eigenvalues` or `energy`)."""
    for leader, covariance in collector.covariances.items():
        if contrast is None or covariance.trace() == 0:  # an expert no reference token reaches: nothing to keep
            bases[leader], eigenvalues[leader] = top_eigenvectors(covariance, selection)
        else:
            bases[leader], energy[leader] = contrastive_basis(covariance, contrast.covariances[leader], selection)


def _exempt_keys(
    model: nn.Module,
    collector: InputCovarianceCollector,
    exemption: Exemption,
    bases: dict[str, torch.Tensor],
    energy: dict[str, float],
    exempted: dict[str, float],
    show_progress: bool,
    across_processes: bool,
    layer_order: LayerOrder,
) -> None:
    """Free each exempted layer input's harm key (`trl_nullspace.estimation.exemption`) in this
    pass' bases; record the reference energy each basis still holds (`energy`) and what it gave up
    (`exempted`). The prompts' class means come from one forward pass per class over this pass'
    targets (sums only, no d×d statistics)."""
    members: dict[str, list[str]] = {}
    for name, leader in collector.group_of.items():
        members.setdefault(leader, []).append(name)
    leaders = [
        leader for leader in collector.covariances if leader in collector.linears and exemption.covers(members[leader])
    ]
    if not leaders:
        return
    means = {}
    for side, batches in (("harmful", exemption.harmful), ("benign", exemption.benign)):
        if batches is None:
            continue
        prompts = InputCovarianceCollector(collector.linears, collector.normalize_tokens, second_moments=False)
        label = f"nullspace: {side} prompts"
        prompts.collect(model, batches, show_progress, label, across_processes, layer_order)
        means[side] = {leader: prompts.sums[leader] / max(prompts.token_counts[leader], 1) for leader in leaders}
    for leader in leaders:
        covariance, tokens = collector.covariances[leader], collector.token_counts[leader]
        benign = means["benign"][leader] if "benign" in means else collector.sums[leader] / tokens
        key = harm_key(covariance, tokens, means["harmful"][leader], benign, exemption.ridge)
        before = energy_share(bases[leader], covariance)
        bases[leader] = exempt_direction(bases[leader], key)
        energy[leader] = energy_share(bases[leader], covariance)
        exempted[leader] = before - energy[leader]


def estimate_activation_subspace(
    model: nn.Module,
    batches: list[ReferenceBatch],
    linears: dict[str, nn.Module],
    selection: RankSelection,
    show_progress: bool = True,
    normalize_tokens: bool = False,
    contrast_batches: list[ReferenceBatch] | None = None,
    experts: dict[str, nn.Module] | None = None,
    statistics_budget_bytes: int | None = None,
    across_processes: bool = False,
    exemption: Exemption | None = None,
) -> CapabilitySubspace:
    """Bases `U` (d_in×k) of the reference inputs of every target Linear, and of every expert of the
    fused `experts` weights (`trl_nullspace.projection.targets.find_target_experts`).

    With `exemption`, the exempted layer inputs' bases give up their harm key
    (`trl_nullspace.estimation.exemption`); `settings["exempted"]` records the reference energy
    each gave up.

    With `across_processes` (every process calls this with the same data), each process reads
    1/world of `batches` and `contrast_batches` and the statistics are summed over the processes
    before the bases are taken, so all get the same bases.

    With `contrast_batches` (the training data), each basis is the `contrastive_basis` of the
    reference and contrast statistics instead of the reference statistic's top eigenvectors.

    The fp64 statistics of a 7B model's layer inputs take 89 GB together, so with
    `statistics_budget_bytes` the layers are estimated in passes whose statistics fit it (one
    forward pass over the reference data each, `plan_passes`); every basis is the same as in one pass.
    """
    bases, eigenvalues, energy, exempted, targets, tokens = {}, {}, {}, {}, {}, 0
    layer_order = LayerOrder(model, [*linears, *(experts or {})])
    reference_passes = collect_in_passes(
        model,
        batches,
        linears,
        normalize_tokens,
        experts,
        statistics_budget_bytes,
        show_progress,
        "nullspace: reference inputs",
        across_processes,
        layer_order,
    )
    with evaluating(model):
        for collector in reference_passes:
            contrast = None
            if contrast_batches is not None:
                contrast = InputCovarianceCollector(collector.linears, normalize_tokens, collector.experts)
                label = "nullspace: training-data inputs"
                contrast.collect(model, contrast_batches, show_progress, label, across_processes, layer_order)
            _add_bases(collector, contrast, selection, bases, eigenvalues, energy)
            if exemption is not None:
                _exempt_keys(
                    model, collector, exemption, bases, energy, exempted, show_progress, across_processes, layer_order
                )
            targets.update(collector.group_of)
            tokens = max([tokens, *collector.token_counts.values()])
            contrast = None  # freed before the next pass collects
    return CapabilitySubspace(
        method="activation",
        bases=bases,
        targets=targets,
        eigenvalues=eigenvalues,
        energy=energy,
        settings={"reference_tokens": tokens, **({"exempted": exempted} if exemption is not None else {})},
    )


@torch.no_grad()
def energy_in_span(
    model: nn.Module,
    batches: list[ReferenceBatch],
    linears: dict[str, nn.Module],
    subspace: CapabilitySubspace,
    normalize_tokens: bool,
    show_progress: bool = False,
    experts: dict[str, nn.Module] | None = None,
    statistics_budget_bytes: int | None = None,
) -> dict[str, float]:
    """Share of the current model's reference-input energy that each basis of `subspace` holds.

    Used when a cache estimated on other weights is reused: if training since then moved the
    layer inputs out of the cached span, the cached bases no longer protect the reference outputs.
    """
    shares = {}
    passes = collect_in_passes(
        model,
        batches,
        linears,
        normalize_tokens,
        experts,
        statistics_budget_bytes,
        show_progress,
        "nullspace: checking the cached subspace",
    )
    with evaluating(model):
        for collector in passes:
            shares.update(_shares_in_span(collector, subspace))
    return shares


def _shares_in_span(collector: InputCovarianceCollector, subspace: CapabilitySubspace) -> dict[str, float]:
    """Per basis of `subspace`, the share of one pass' statistic it holds."""
    shares = {}
    for leader, covariance in collector.covariances.items():
        key = subspace.targets.get(leader)
        if key is None:
            continue
        basis = subspace.bases[key].to(covariance.device, torch.float64)
        total = covariance.trace().item()
        shares[key] = ((basis.T @ covariance @ basis).trace().item() / total) if total > 0 else 1.0
    return shares
