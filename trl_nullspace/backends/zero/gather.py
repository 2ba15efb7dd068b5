"""Materialising DeepSpeed ZeRO-3-partitioned parameters where the trainer needs them whole.

Before DeepSpeed's engine exists (the subspace is estimated while the trainer is built), nothing
fetches partitioned weights for a forward pass. `gathered` materialises a list at once: right for
a few weights, but the whole model's would be 131 GiB at 70B in bf16 on every rank.
`gathered_layer_by_layer` instead gathers each decoder layer (and each module outside the layers)
only while it runs, as DeepSpeed's own forward does: a forward pass then holds one layer at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from trl_nullspace.projection.targets import decoder_layer_of


def is_partitioned(parameter: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 holds this parameter (possibly partitioned away from the module)."""
    return hasattr(parameter, "ds_id")


@contextlib.contextmanager
def gathered(parameters: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Materialise ZeRO-3-partitioned parameters for the block (a collective: every rank must enter).

    With `modifier_rank`, that rank's in-place changes are re-partitioned on exit. Without ZeRO-3
    parameters this does nothing.
    """
    partitioned = [parameter for parameter in parameters if is_partitioned(parameter)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def gather_units(model: nn.Module) -> list[tuple[nn.Module, list[nn.Parameter]]]:
    """The modules gathered as one while they run: every outermost indexed module (a decoder layer,
    `model.layers.11`, with all its parameters; experts inside it included, so the tokens' routing
    never decides what is gathered) and, outside those, every module with parameters of its own."""
    units = []

    def visit(name: str, module: nn.Module) -> None:
        if decoder_layer_of(name) == name:
            units.append((module, list(module.parameters())))
            return
        own = list(module.parameters(recurse=False))
        if own:
            units.append((module, own))
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return units


@dataclass
class GatherPeak:
    """The most parameter values materialised at once while the trainer gathered them itself (an
    estimate layer by layer, anchors weight by weight), of `total`: read from DeepSpeed's own status
    of every parameter, persistent small ones included."""

    parameters: list[nn.Parameter]
    total: int
    peak: int = 0

    @classmethod
    def of(cls, model: nn.Module) -> GatherPeak | None:
        """A tracker for `model`'s ZeRO-3 parameters; None without them (nothing is gathered)."""
        parameters = list({id(parameter): parameter for parameter in model.parameters()}.values())
        if not any(is_partitioned(parameter) for parameter in parameters):
            return None
        return cls(parameters, sum(_numel(parameter) for parameter in parameters))

    def observe(self) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        held = sum(
            _numel(parameter)
            for parameter in self.parameters
            if not is_partitioned(parameter) or parameter.ds_status == ZeroParamStatus.AVAILABLE
        )
        self.peak = max(self.peak, held)


@contextlib.contextmanager
def gathered_layer_by_layer(model: nn.Module, peak: GatherPeak | None) -> Iterator[None]:
    """Within the block, each forward pass of `model` gathers each of its `gather_units` only while
    it runs: a collective per unit, so every rank must run the same forward passes through the same
    layers. The unit is released even when its forward, or a hook after it, raises (a pass ended
    early), so no gathered weights outlive it. `peak` (from `GatherPeak.of(model)`; None without
    ZeRO-3 parameters, and then nothing is gathered) records the most held at once."""
    if peak is None:
        yield
        return
    import deepspeed

    open_units: list[deepspeed.zero.GatheredParameters] = []

    def gather(own: list[nn.Parameter]) -> None:
        unit = deepspeed.zero.GatheredParameters(own)
        unit.__enter__()
        open_units.append(unit)
        peak.observe()

    def release(module: nn.Module, args: tuple, output: object) -> None:
        open_units.pop().__exit__(None, None, None)

    handles = []
    for module, own in gather_units(model):
        handles.append(module.register_forward_pre_hook(lambda module, args, own=own: gather(own)))
        handles.append(module.register_forward_hook(release, always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def gathered_alone(parameter: nn.Parameter, peak: GatherPeak | None, modifier_rank: int) -> Iterator[None]:
    """`gathered` for one parameter, recording what is held then in `peak`: used weight by weight,
    no more than one weight is whole at a time (a collective per parameter; `modifier_rank`'s
    in-place changes are kept)."""
    with gathered([parameter], modifier_rank=modifier_rank):
        if peak is not None:
            peak.observe()
        yield


def _numel(parameter: torch.Tensor) -> int:
    return parameter.ds_numel if is_partitioned(parameter) else parameter.numel()
