"""Which modules of a (possibly PEFT-wrapped) model the capability subspace constrains."""

from __future__ import annotations

import re

from torch import nn
from transformers.pytorch_utils import Conv1D

from trl_nullspace.projection.experts import DOWN, GATE_UP, ROUTER_NAMES, is_fused_experts, is_router

_PEFT_PREFIX = "base_model.model."


def canonical_name(name: str) -> str:
    """The module or parameter name in the base model: PEFT's wrapper prefix and `.base_layer` removed."""
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    return re.sub(r"\.base_layer(?=\.|$)", "", name)


_FIRST_INDEX = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def decoder_layer_of(name: str) -> str | None:
    """The decoder layer a module or parameter name sits in: the name up to its first index
    (`model.layers.11`), or None if it has no index (embeddings, final norm, LM head)."""
    match = _FIRST_INDEX.match(name)
    return match.group(1) if match else None


def is_lora_layer(module: nn.Module) -> bool:
    """A PEFT LoRA layer: a wrapper holding `base_layer` and per-adapter `lora_A`/`lora_B`."""
    return hasattr(module, "base_layer") and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)


def _output_embedding_names(model: nn.Module) -> set[str]:
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if get_output is not None else None
    return {canonical_name(name) for name, module in model.named_modules() if output is not None and module is output}


def is_transposed_linear(module: nn.Module) -> bool:
    """transformers' `Conv1D` (GPT-2 and its descendants): a linear layer `y = x W + b` whose weight
    is stored as (in × out), the transpose of `nn.Linear`'s."""
    return isinstance(module, Conv1D)


def find_target_linears(model: nn.Module, target_modules: list[str] | None = None) -> dict[str, nn.Module]:
    """Target linear layers (`nn.Linear`, `Conv1D`, and the routers of fused mixture-of-experts
    layers) by canonical name; for LoRA layers, their frozen `base_layer`.

    `target_modules` are name suffixes (`q_proj` matches `model.layers.0.self_attn.q_proj`); each must
    match at least one Linear. With None, every Linear except the output embedding is a target:
    `lm_head` maps hidden states to logits directly, so constraining it protects nothing further
    upstream, and it is frozen with the other untargeted parameters by default.
    """
    excluded = _output_embedding_names(model)
    linears: dict[str, nn.Module] = {}
    routers = {
        id(getattr(parent, name))
        for parent in model.modules()
        for name in ROUTER_NAMES
        if isinstance(getattr(parent, name, None), nn.Module) and is_router(getattr(parent, name), parent)
    }
    for name, module in model.named_modules():
        linear = isinstance(module, nn.Linear) or is_transposed_linear(module) or id(module) in routers
        if is_lora_layer(module) or not linear:
            continue
        if ".lora_" in name:
            continue
        canonical = canonical_name(name)
        if canonical in excluded:
            continue
        linears[canonical] = module
    if target_modules is None:
        if not linears:
            raise ValueError(
                "The model has no linear layers (nn.Linear or transformers' Conv1D) to constrain: see "
                "docs/architectures.md for the supported architectures."
            )
        return linears
    selected = {name: module for name, module in linears.items() if matches_suffix(name, target_modules)}
    unmatched = [
        target
        for target in target_modules
        if not any(matches_suffix(name, [target]) for name in [*linears, *find_target_experts(model)])
    ]
    if unmatched:
        raise ValueError(
            f"nullspace_target_modules {unmatched} match no Linear layer of this model. "
            f"Linear layers look like: {sorted(linears)[:6]}"
        )
    return selected


def find_target_experts(model: nn.Module, target_modules: list[str] | None = None) -> dict[str, nn.Module]:
    """The 3-D weights of fused mixture-of-experts modules (`trl_nullspace.projection.experts`), as
    `<experts>.gate_up_proj` / `<experts>.down_proj` → the experts module: all of them, or those whose
    name matches a `target_modules` suffix."""
    return {
        f"{canonical_name(name)}.{weight}": module
        for name, module in model.named_modules()
        if is_fused_experts(module)
        for weight in (GATE_UP, DOWN)
        if target_modules is None or matches_suffix(f"{canonical_name(name)}.{weight}", target_modules)
    }


def matches_suffix(name: str, suffixes: list[str]) -> bool:
    """Whether `name` is one of `suffixes` or ends in `.suffix` (how `nullspace_*_modules` name modules)."""
    return any(name == suffix or name.endswith("." + suffix) for suffix in suffixes)
