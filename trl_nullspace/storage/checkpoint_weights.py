"""Weights a resumed run would silently not restore: those transformers saves in another layout.

transformers 5 saves some weights in their original checkpoint layout, e.g. the fused experts of
Qwen2/3-MoE and Mixtral as one matrix per expert (`experts.0.gate_proj.weight`, …), and converts
them back only in `from_pretrained`. The Trainer resumes with a plain `load_state_dict(strict=False)`,
which skips them: the run goes on from the experts it started with (plain TRL too: on the tests'
tiny Qwen3-MoE, 0.04 apart from the uninterrupted run after 3 more steps). After the Trainer's load,
the null-space trainers reload exactly those parameters through `from_pretrained`, which converts
them.

Cost: nothing unless parameters are missing from the checkpoint's weights file; then one extra
load of the checkpoint into host memory (a second copy of the model, briefly). Not used under
DeepSpeed or FSDP, which resume from their own checkpoint formats, nor for PEFT adapters.
"""

from __future__ import annotations

import os

import torch
from safetensors import safe_open
from torch import nn
from transformers.utils import SAFE_WEIGHTS_NAME


def parameters_not_in_checkpoint(model: nn.Module, checkpoint: str) -> list[str]:
    """Names of `model`'s parameters that its single-file safetensors checkpoint does not hold as
    such (tied weights count once, as `named_parameters` lists them)."""
    path = os.path.join(checkpoint, SAFE_WEIGHTS_NAME)
    if not os.path.isfile(path):
        return []
    with safe_open(path, framework="pt") as handle:
        saved = set(handle.keys())
    return [name for name, _ in model.named_parameters() if name not in saved]


@torch.no_grad()
def reload_converted_weights(model: nn.Module, checkpoint: str) -> list[str]:
    """Restore the parameters the Trainer's plain load skipped (`parameters_not_in_checkpoint`)
    from `checkpoint` through `from_pretrained`; returns their names. Refuses by name a checkpoint
    that does not hold them in any layout."""
    missing = parameters_not_in_checkpoint(model, checkpoint)
    if not missing:
        return []
    dtype = next(model.parameters()).dtype
    reloaded = dict(type(model).from_pretrained(checkpoint, dtype=dtype).named_parameters())
    absent = [name for name in missing if name not in reloaded]
    if absent:
        raise RuntimeError(
            f"The checkpoint {checkpoint} holds no value for {absent[:3]} ({len(absent)} in all), in any layout "
            "transformers converts: resuming would train them from their current values. Resume from a complete "
            "checkpoint."
        )
    parameters = dict(model.named_parameters())
    for name in missing:
        parameters[name].copy_(reloaded[name].to(parameters[name].device))
    return missing
