"""Saving a capability subspace as safetensors with JSON metadata, and refusing mismatched caches.

The file holds `basis/<key>` (n×k, fp32) and `eigenvalues/<key>` tensors; the header's
`trl_nullspace` entry is a JSON document with the method, rank settings, target map, the model's
name and fingerprints, the reference data's fingerprint, the library version and a SHA-256 of the
tensors. Writes go to a temporary file renamed into place, so an interrupted run never leaves a
truncated cache.

A cache damaged after it was written (a disk, a copy, an edit) must not be trained with: zeroed
bytes silently shrink a basis and its layer loses protection, flipped bits may give NaNs that
surface as an error about the model's weights. So loading verifies the checksum (about 1 s per GiB)
and probes every basis for orthonormality (`_check_orthonormal`, O(n·k) per basis), and refuses
either failure by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from trl_nullspace._version import __version__
from trl_nullspace.config import NullSpaceArguments
from trl_nullspace.estimation.exemption import Exemption
from trl_nullspace.estimation.reference import ReferenceBatch, reference_fingerprint
from trl_nullspace.estimation.subspace import CapabilitySubspace
from trl_nullspace.storage.fingerprint import architecture_fingerprint, model_name

FORMAT_VERSION = 3  # 3: the tensors' checksum
# |‖U g‖² / ‖g‖² − 1| a stored basis may show for random probes g: fp32 round-off of an orthonormal basis is ~1e-6.
ORTHONORMAL_TOLERANCE = 1e-4
_HEADER_KEY = "trl_nullspace"


class CacheMismatchError(ValueError):
    """A cached subspace does not belong to this model, data or configuration."""


def save_subspace(
    path: str,
    subspace: CapabilitySubspace,
    provenance: dict[str, Any],
    anchors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write `subspace` and its provenance (model/reference fingerprints, settings) atomically.

    `anchors` (the `update` projection's `M₀ U` per constrained parameter) are written by trainer
    checkpoints, so a resumed run keeps projecting onto the same affine set.
    """
    tensors, header = _contents(subspace, provenance, anchors)
    _write_atomically(path, tensors, header)


def save_linked(
    path: str,
    store: str,
    subspace: CapabilitySubspace,
    provenance: dict[str, Any],
    anchors: dict[str, torch.Tensor] | None = None,
) -> str:
    """`save_subspace` for checkpoints: the contents are written once into `store`, named by their hash,
    and `path` is a hard link to that file, so 20 checkpoints of one run hold one copy on disk (bases
    and anchors do not change between checkpoints, only at a refresh). A hard link is a file of its
    own: deleting, rotating or copying a checkpoint folder never loses it. Where the filesystem has
    no hard links, `path` is a copy. Returns the stored file."""
    tensors, header = _contents(subspace, provenance, anchors)
    stored = os.path.join(store, f"{_json_hash(header)[:20]}.safetensors")
    if not os.path.exists(stored):
        _write_atomically(stored, tensors, header)
    if os.path.exists(path):
        os.unlink(path)
    try:
        os.link(stored, path)
    except OSError:
        shutil.copyfile(stored, path)
    return stored


def _contents(
    subspace: CapabilitySubspace, provenance: dict[str, Any], anchors: dict[str, torch.Tensor] | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {f"basis/{key}": basis.detach().cpu().contiguous() for key, basis in subspace.bases.items()}
    tensors.update(
        {f"eigenvalues/{key}": values.detach().cpu().contiguous() for key, values in subspace.eigenvalues.items()}
    )
    tensors.update({f"anchor/{name}": anchor.detach().cpu().contiguous() for name, anchor in (anchors or {}).items()})
    header = {
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "method": subspace.method,
        "targets": subspace.targets,
        "energy": subspace.energy,
        "settings": subspace.settings,
        **provenance,
        "checksum": tensors_checksum(tensors),
    }
    return tensors, header


def _write_atomically(path: str, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata={_HEADER_KEY: json.dumps(header)})
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def load_subspace(path: str) -> tuple[CapabilitySubspace, dict[str, Any]]:
    """Read a cache written by `save_subspace`; returns the subspace and its header.

    The header's `anchors` entry holds the saved anchors by parameter name (empty for a plain cache).
    """
    try:
        handle = safe_open(path, framework="pt")
    except Exception as error:  # safetensors raises its own error type for truncated or foreign files
        raise CacheMismatchError(
            f"{path} is not a readable safetensors file ({error}): it is truncated or not a subspace cache. Delete "
            "it to re-estimate the subspace."
        ) from error
    with handle:
        metadata = handle.metadata() or {}
        if _HEADER_KEY not in metadata:
            raise CacheMismatchError(f"{path} is a safetensors file but not a trl-nullspace subspace cache.")
        header = json.loads(metadata[_HEADER_KEY])
        if header.get("format_version") != FORMAT_VERSION:
            raise CacheMismatchError(
                f"{path} has cache format {header.get('format_version')}; this library reads {FORMAT_VERSION}. "
                "Re-estimate the subspace."
            )
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    if tensors_checksum(tensors) != header.get("checksum"):
        raise CacheMismatchError(
            f"{path}'s tensors do not match the checksum written with them: the file was damaged after it was "
            "written (disk, copy or edit). Delete it to re-estimate the subspace."
        )
    tables: dict[str, dict[str, torch.Tensor]] = {"basis": {}, "eigenvalues": {}, "anchor": {}}
    for name, tensor in tensors.items():
        kind, key = name.split("/", 1)
        tables[kind][key] = tensor
    _check_orthonormal(path, tables["basis"])
    subspace = CapabilitySubspace(
        method=header["method"],
        bases=tables["basis"],
        targets=header["targets"],
        eigenvalues=tables["eigenvalues"],
        energy=header.get("energy", {}),
        settings=header["settings"],
    )
    header["anchors"] = tables["anchor"]
    return subspace, header


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # Flattened first: a "contiguous" (n × 1) basis may keep any stride on its last, size-1, dimension.
        flat = tensor.contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def _check_orthonormal(path: str, bases: dict[str, torch.Tensor]) -> None:
    """Refuse a stored basis whose columns are not orthonormal, probed with 4 random vectors (an
    orthonormal U keeps every length, ‖U g‖ = ‖g‖): a full UᵀU would cost O(n·k²) per basis, minutes
    for a 7B model on CPU, and the checksum already catches damage after writing."""
    generator = torch.Generator().manual_seed(0)
    for key, basis in bases.items():
        if basis.numel() == 0:
            continue
        probes = torch.randn(basis.shape[1], 4, generator=generator, dtype=torch.float64)
        ratios = (basis.double() @ probes).square().sum(0) / probes.square().sum(0)
        error = (ratios - 1.0).abs().max().item()
        if not error <= ORTHONORMAL_TOLERANCE:  # NaN fails too
            raise CacheMismatchError(
                f"{path}: the basis of {key} is not orthonormal (a probe's length changed by {error:.3g}, more than "
                f"{ORTHONORMAL_TOLERANCE:g}); projecting with it would not keep updates out of the subspace. Delete "
                "the file to re-estimate the subspace."
            )


def expected_provenance(
    model: nn.Module,
    settings: NullSpaceArguments,
    batches: list[ReferenceBatch] | None,
    weights: str,
    contrast_batches: list[ReferenceBatch] | None = None,
    exemption: Exemption | None = None,
) -> dict[str, Any]:
    """What a cache must record to serve this model and these settings (the weights only if they
    must match, the reference and training data only if there is any to compare with)."""
    expected = {
        "method": settings.nullspace_method,
        "rank_selection": settings.nullspace_rank_selection.to_dict(),
        "target_modules": settings.nullspace_target_modules,
        "normalize_tokens": settings.nullspace_normalize_tokens,
        "contrastive": settings.nullspace_contrastive,
        "architecture_fingerprint": architecture_fingerprint(model),
    }
    if settings.nullspace_cache_match_weights:
        expected["weights_fingerprint"] = weights
    if batches is not None:
        expected["reference_fingerprint"] = reference_fingerprint(batches)
    if contrast_batches is not None:
        expected["contrast_fingerprint"] = reference_fingerprint(contrast_batches)
    # Always recorded (None: no exemption), so a cache that freed harm keys never serves a run that did not ask to.
    expected["exemption"] = None if exemption is None else {"modules": exemption.modules, "ridge": exemption.ridge}
    if exemption is not None:
        expected["exempt_fingerprint"] = reference_fingerprint(exemption.harmful + (exemption.benign or []))
    return expected


def resolve_cache_path(path: str | None, model: nn.Module, expected: dict[str, Any]) -> str | None:
    """The cache file `nullspace_cache_path` names: the path itself, or, for a folder (one that exists,
    or a path ending in a separator), a file in it named by the model and a hash of `expected`, so
    each model, reference set and setting gets its own file and a change of settings never meets
    another setting's cache."""
    if path is None or not (os.path.isdir(path) or path.endswith(os.sep)):
        return path
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", model_name(model)).strip("-") or "model"
    return os.path.join(path, f"{name}-{_json_hash(expected)[:16]}.safetensors")


def _json_hash(value: dict[str, Any]) -> str:
    """SHA-256 of `value` as canonical JSON: names a file by what it holds or must match."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def saved_provenance(model: nn.Module, weights: str, expected: dict[str, Any]) -> dict[str, Any]:
    """What a written cache or checkpoint records: the expectations, the model's name and weights."""
    return {"model_name": model_name(model), "weights_fingerprint": weights, **expected}


def check_cache_matches(path: str, header: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise `CacheMismatchError` naming every field of `expected` the cache disagrees with."""
    explanations = {
        "architecture_fingerprint": "the cache was estimated for a different architecture",
        "weights_fingerprint": "the cache was estimated from different weights",
        "reference_fingerprint": "the cache was estimated from different reference data",
        "method": "the cache holds another subspace method",
        "rank_selection": "the cache used other rank-selection settings",
        "target_modules": "the cache constrains other target modules",
        "normalize_tokens": "the cache weighted reference tokens differently (nullspace_normalize_tokens)",
        "contrastive": "the cache used another rank rule (nullspace_contrastive)",
        "contrast_fingerprint": "the cache's contrastive rule saw other contrast data (nullspace_contrast_dataset)",
        "exemption": "the cache exempted other layer inputs or none (nullspace_exempt_*)",
        "exempt_fingerprint": "the cache's harm keys came from other exempt prompts",
    }
    problems = [
        f"  - {key}: cache has {header.get(key)!r}, expected {value!r} ({explanations.get(key, 'differs')})"
        for key, value in expected.items()
        if header.get(key) != value
    ]
    if problems:
        raise CacheMismatchError(
            f"Subspace cache {path} (built for model {header.get('model_name')!r}) does not match this run:\n"
            + "\n".join(problems)
            + "\nDelete the file, point nullspace_cache_path elsewhere (a folder keeps one file per setting), or "
            "set nullspace_cache_overwrite=True to re-estimate and replace it."
        )
