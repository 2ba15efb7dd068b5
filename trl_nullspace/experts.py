"""Mixture-of-experts layers: each expert of a fused 3-D weight, and the router, as constrained targets.

transformers 5 stores the experts of Mixtral, Qwen2-MoE and Qwen3-MoE as two 3-D parameters,
`gate_up_proj` (experts × 2·intermediate × hidden) and `down_proj` (experts × hidden ×
intermediate), and sends each token to its top-k experts by a router whose weight is
(experts × hidden). Expert `e`'s slices are ordinary (out × in) matrices, so the null-space rule
applies to each: its inputs are the reference tokens routed to it (for `down_proj`, their gated
intermediate `act(gate) · up`), a subset of the MLP input, which leaves more room than one basis for
the whole MLP input would. That is exact as long as the reference tokens keep their routes, and they
do: the router is constrained by the basis of its own input (the MLP input), so its logits on the
reference tokens do not move either. An expert no reference token reaches gets an empty basis: it
does not take part in the reference outputs.

Layouts other than this one (GPT-OSS: transposed, interleaved gate/up, biases) are not constrained;
the trainer freezes them and says so.
"""

from __future__ import annotations

import torch
from torch import nn

GATE_UP, DOWN = "gate_up_proj", "down_proj"


def is_fused_experts(module: nn.Module) -> bool:
    """Experts in the Mixtral layout: 3-D `gate_up_proj` (E × 2I × H) and `down_proj` (E × H × I), gate
    and up concatenated, not transposed, no biases (the flags transformers' experts decorator sets)."""
    gate_up, down = getattr(module, GATE_UP, None), getattr(module, DOWN, None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)):
        return False
    if gate_up.dim() != 3 or down.dim() != 3 or not callable(getattr(module, "act_fn", None)):
        return False
    if getattr(module, "is_transposed", False) or getattr(module, "has_bias", False):
        return False
    if not getattr(module, "is_concatenated", True):
        return False
    experts, twice_intermediate, hidden = gate_up.shape
    return down.shape == (experts, hidden, twice_intermediate // 2) and twice_intermediate % 2 == 0


def is_router(module: nn.Module, parent: nn.Module) -> bool:
    """The router beside fused experts: `parent.gate`, a module with an (E × H) weight."""
    experts = getattr(parent, "experts", None)
    weight = getattr(module, "weight", None)
    if experts is None or not is_fused_experts(experts) or getattr(parent, "gate", None) is not module:
        return False
    gate_up = getattr(experts, GATE_UP)
    return isinstance(weight, nn.Parameter) and tuple(weight.shape) == (gate_up.shape[0], gate_up.shape[2])


def slice_name(parameter_name: str, expert: int) -> str:
    """The target name of one expert's matrix: `<parameter>[<expert>]`."""
    return f"{parameter_name}[{expert}]"


@torch.no_grad()
def routed_inputs(
    module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, mask: torch.Tensor
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per expert, (the `gate_up_proj` inputs, the `down_proj` inputs) of the unmasked tokens routed
    to it, computed as the experts' forward computes them."""
    gate_up = getattr(module, GATE_UP)
    selected = top_k_index.reshape(hidden_states.shape[0], -1)
    inputs = {}
    for expert in range(gate_up.shape[0]):
        routed = (selected == expert).any(dim=-1) & mask
        tokens = hidden_states[routed]
        gate, up = nn.functional.linear(tokens, gate_up[expert]).chunk(2, dim=-1)
        inputs[expert] = (tokens, module.act_fn(gate) * up)
    return inputs
