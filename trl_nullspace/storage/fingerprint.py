"""Fingerprints that tie a cached subspace to the model and data it was estimated from."""

from __future__ import annotations

import hashlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from trl_nullspace.backends.zero.gather import gathered
from trl_nullspace.projection.constrained import full_shape
from trl_nullspace.projection.kinds.registry import owned_by_a_kind
from trl_nullspace.projection.targets import canonical_name

_SAMPLES_PER_PARAMETER = 1024


def _base_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Base-model parameters by canonical name (adapter weights excluded), sorted."""
    named = {
        canonical_name(name): parameter for name, parameter in model.named_parameters() if not owned_by_a_kind(name)
    }
    return sorted(named.items())


def architecture_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model type and every base parameter's name and shape."""
    digest = hashlib.sha256(str(getattr(getattr(model, "config", None), "model_type", "")).encode())
    for name, parameter in _base_parameters(model):
        digest.update(f"{name}:{full_shape(parameter)};".encode())
    return digest.hexdigest()


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank. FSDP2 holds parameters as DTensor row shards (possibly
    uneven), which cannot be flattened or read as NumPy: gather them (a collective, like ZeRO-3's)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 of up to 1024 evenly spaced values of every base parameter (exact fp32 bits).

    Sampling keeps this fast for billion-parameter models; any training step changes sampled
    values, so a cache estimated from other weights (another checkpoint, a fine-tuned model) is
    recognised. Under ZeRO-3 and FSDP2 each parameter is gathered in turn, so every rank must call
    this; the result is the unsharded model's.
    """
    digest = hashlib.sha256()
    for name, parameter in _base_parameters(model):
        with gathered([parameter]):
            flat = _whole(parameter.detach()).reshape(-1)
            step = max(1, flat.numel() // _SAMPLES_PER_PARAMETER)
            digest.update(name.encode())
            digest.update(flat[::step].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def model_name(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
