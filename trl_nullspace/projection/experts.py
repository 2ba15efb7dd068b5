"""Mixture-of-experts layers: each expert of a fused 3-D weight, and the router, as constrained targets.

transformers 5 stores the experts of Mixtral, Qwen2-MoE and Qwen3-MoE as two 3-D parameters,
`gate_up_proj` (experts × 2·intermediate × hidden) and `down_proj` (experts × hidden ×
intermediate), and sends each token to its top-k experts by a router whose weight is
(experts × hidden). GPT-OSS stores the same two weights transposed (experts × in × out), with
biases, and its own gate (`_apply_gate`). Expert `e`'s slices are ordinary matrices, so the
null-space rule applies to each: its inputs are the reference tokens routed to it (for `down_proj`,
their gated intermediate), a subset of the MLP input, which leaves more room than one basis for the
whole MLP input would. That is exact as long as the reference tokens keep their routes, and they
do: the router is constrained by the basis of its own input (the MLP input), so its logits on the
reference tokens do not move either. An expert no reference token reaches gets an empty basis: it
does not take part in the reference outputs. Biases (GPT-OSS's experts and router) shift every
routed token's output, so they stay frozen.
"""

from __future__ import annotations

import torch
from torch import nn

GATE_UP, DOWN = "gate_up_proj", "down_proj"


def is_fused_experts(module: nn.Module) -> bool:
    """Experts whose inputs this module can recompute: the Mixtral layout (gate and up concatenated,
    `act_fn`, no biases) or GPT-OSS's (transposed, biased, `_apply_gate`)."""
    gate_up, down = getattr(module, GATE_UP, None), getattr(module, DOWN, None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)):
        return False
    if gate_up.dim() != 3 or down.dim() != 3:
        return False
    if is_transposed_experts(module):
        experts, hidden, twice_intermediate = gate_up.shape
        expected_down = (experts, twice_intermediate // 2, hidden)
        gated = callable(getattr(module, "_apply_gate", None)) and hasattr(module, f"{GATE_UP}_bias")
    else:
        experts, twice_intermediate, hidden = gate_up.shape
        expected_down = (experts, hidden, twice_intermediate // 2)
        gated = callable(getattr(module, "act_fn", None)) and getattr(module, "is_concatenated", True)
        gated = gated and not getattr(module, "has_bias", False)
    return bool(gated) and tuple(down.shape) == expected_down and twice_intermediate % 2 == 0


def is_transposed_experts(module: nn.Module) -> bool:
    """Weights stored (experts × in × out), as transformers' experts decorator flags them (GPT-OSS)."""
    return bool(getattr(module, "is_transposed", False))


def hidden_size(module: nn.Module) -> int:
    gate_up = getattr(module, GATE_UP)
    return gate_up.shape[1] if is_transposed_experts(module) else gate_up.shape[2]


ROUTER_NAMES = ("gate", "router")


def is_router(module: nn.Module, parent: nn.Module) -> bool:
    """The router beside fused experts (`parent.gate`, or GPT-OSS's `parent.router`): an (E × H) weight."""
    experts = getattr(parent, "experts", None)
    weight = getattr(module, "weight", None)
    if not isinstance(experts, nn.Module) or not is_fused_experts(experts):
        return False
    if not any(getattr(parent, name, None) is module for name in ROUTER_NAMES):
        return False
    shape = (getattr(experts, GATE_UP).shape[0], hidden_size(experts))
    return isinstance(weight, nn.Parameter) and tuple(weight.shape) == shape


def slice_name(parameter_name: str, expert: int) -> str:
    """The target name of one expert's matrix: `<parameter>[<expert>]`."""
    return f"{parameter_name}[{expert}]"


@torch.no_grad()
def routed_inputs(
    module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, mask: torch.Tensor
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per expert, (the `gate_up_proj` inputs, the `down_proj` inputs) of the unmasked tokens routed
    to it, computed as the experts' forward computes them: through the module's own `_apply_gate`
    where it has one (GPT-OSS, DeepSeek-V4's clamped SwiGLU), else `act_fn(gate) · up`."""
    gate_up = getattr(module, GATE_UP)
    selected = top_k_index.reshape(hidden_states.shape[0], -1)
    inputs = {}
    for expert in range(gate_up.shape[0]):
        tokens = hidden_states[(selected == expert).any(dim=-1) & mask]
        if is_transposed_experts(module):
            intermediate = module._apply_gate(tokens @ gate_up[expert] + getattr(module, f"{GATE_UP}_bias")[expert])
        elif callable(getattr(module, "_apply_gate", None)):  # the module's own gate (DeepSeek-V4's clamp)
            intermediate = module._apply_gate(nn.functional.linear(tokens, gate_up[expert]))
        else:
            gate, up = nn.functional.linear(tokens, gate_up[expert]).chunk(2, dim=-1)
            intermediate = module.act_fn(gate) * up
        inputs[expert] = (tokens, intermediate)
    return inputs
