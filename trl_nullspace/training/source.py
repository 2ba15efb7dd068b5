"""`SubspaceSource`: where a constraint's capability subspace comes from, a cache or an estimate.

It tokenizes the data the subspace is estimated from (the reference data; the contrast data, for
the contrastive rule; the harm-keyed exemption's prompts), loads a cache and checks that it still
describes this model, or estimates the subspace (the data shared over the processes; under
ZeRO-3 one decoder layer gathered at a time), and checks that every process holds the same bases.
It knows nothing of projection or of the Trainer: `CapabilityConstraint` binds what it returns.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging

from trl_nullspace.backends.agreement import items_differing_between_ranks
from trl_nullspace.backends.zero.gather import GatherPeak, gathered, gathered_layer_by_layer
from trl_nullspace.config import NullSpaceArguments
from trl_nullspace.data.loading import load_dataset_from
from trl_nullspace.estimation.activation import energy_in_span
from trl_nullspace.estimation.estimate import estimate_subspace
from trl_nullspace.estimation.exemption import Exemption
from trl_nullspace.estimation.reference import ReferenceBatch, tokenize_reference
from trl_nullspace.estimation.subspace import CapabilitySubspace
from trl_nullspace.projection.targets import find_target_experts, find_target_linears, matches_suffix
from trl_nullspace.storage.cache import (
    CacheMismatchError,
    check_cache_matches,
    expected_provenance,
    load_subspace,
    resolve_cache_path,
    save_subspace,
    saved_provenance,
)
from trl_nullspace.storage.fingerprint import architecture_fingerprint, weights_fingerprint

logger = logging.get_logger(__name__)

# In every checkpoint: the subspace and anchors it trained under (a hard link into the run's store).
CHECKPOINT_FILE = "nullspace_subspace.safetensors"

# A reused cache may miss at most REUSE_FACTOR times the share of the reference energy its estimate left out,
# and never less than REUSE_FLOOR (an amplitude of 1e-3 of the inputs outside the span).
REUSE_FACTOR = 10.0
REUSE_FLOOR = 1e-6
# What the defaults were measured with (`make bench-real`'s general reference data, counted by the
# trainer's own tokenisation at its default 512 examples of at most 512 tokens): examples, tokens.
MEASURED_REFERENCE = (122, 14219)
MEASURED_REFERENCE_WIDEST_INPUT = 1536  # SmolLM2-135M's down_proj input


class SubspaceSource:
    """The subspace's data, cache and estimate for one trainer's `model` and `args`.

    `reference_batches` (None: the subspace must come from a cache), `contrast_batches` (the
    contrastive rule's, else None) and `exemption` are tokenized once, here. `cache_file` is the file
    `nullspace_cache_path` resolved to; `estimated_from` the fingerprint of the weights the subspace
    in use was estimated or loaded for (what a checkpoint and a refresh record); `gather_peak` what
    the set-up gathered at once under ZeRO-3 (None otherwise).
    """

    def __init__(
        self,
        model: nn.Module,
        args: NullSpaceArguments,
        accelerator: Accelerator,
        processing_class: Any,
        reference_dataset: datasets.Dataset | None = None,
        contrast_dataset: datasets.Dataset | None = None,
        exempt_dataset: datasets.Dataset | None = None,
        train_dataset: Any = None,
    ):
        self.model = model
        self.args = args
        self.accelerator = accelerator
        # The text tokenizer, also when the processing class is a multimodal processor.
        self.tokenizer: PreTrainedTokenizerBase = (
            processing_class if isinstance(processing_class, PreTrainedTokenizerBase) else processing_class.tokenizer
        )
        self.gather_peak = GatherPeak.of(model)
        self.cache_file: str | None = None
        self.estimated_from = ""
        self.reference_batches = self._load_reference_batches(reference_dataset)
        self.contrast_batches = self._load_contrast_batches(contrast_dataset, train_dataset)
        self.exemption = self._load_exemption(exempt_dataset)

    def _load_reference_batches(self, reference_dataset: datasets.Dataset | None) -> list[ReferenceBatch] | None:
        if reference_dataset is None and self.args.nullspace_reference_dataset is not None:
            reference_dataset = load_dataset_from(
                self.args.nullspace_reference_dataset, self.args.nullspace_reference_split
            )
        if reference_dataset is None:
            return None
        return self.tokenize(reference_dataset)

    def tokenize(self, dataset: datasets.Dataset, num_samples: int | None = None) -> list[ReferenceBatch]:
        """`dataset` as the estimate reads it: batches of `nullspace_reference_batch_size`, cut at
        `nullspace_reference_max_length`, the first `num_samples` (default `nullspace_reference_num_samples`)."""
        return tokenize_reference(
            dataset,
            self.tokenizer,
            batch_size=self.args.nullspace_reference_batch_size,
            max_length=self.args.nullspace_reference_max_length,
            num_samples=self.args.nullspace_reference_num_samples if num_samples is None else num_samples,
        )

    def _load_contrast_batches(
        self, contrast_dataset: datasets.Dataset | None, train_dataset: Any
    ) -> list[ReferenceBatch] | None:
        """The contrastive rule's batches: `contrast_dataset`, else `nullspace_contrast_dataset`, else the
        training data as the user passed it; None without `nullspace_contrastive`."""
        if not self.args.nullspace_contrastive:
            if contrast_dataset is not None:
                raise ValueError(
                    "contrast_dataset= is the contrastive rule's data; set nullspace_contrastive=True to use it, or "
                    "leave it out."
                )
            return None
        if contrast_dataset is None and self.args.nullspace_contrast_dataset is not None:
            contrast_dataset = load_dataset_from(
                self.args.nullspace_contrast_dataset, self.args.nullspace_contrast_split
            )
        if contrast_dataset is None:
            contrast_dataset = train_dataset
        if not isinstance(contrast_dataset, datasets.Dataset):
            raise ValueError(
                "nullspace_contrastive needs its contrast data (contrast_dataset=, else train_dataset) as a "
                f"datasets.Dataset (its inputs shape the subspace); got {type(contrast_dataset).__name__}."
            )
        return self.tokenize(contrast_dataset)

    def _load_exemption(self, exempt_dataset: datasets.Dataset | None) -> Exemption | None:
        """The harm-keyed exemption's prompts (`trl_nullspace.estimation.exemption`), split by their
        `harmful` column; None without an exempt dataset."""
        if exempt_dataset is None and self.args.nullspace_exempt_dataset is not None:
            exempt_dataset = load_dataset_from(self.args.nullspace_exempt_dataset, self.args.nullspace_exempt_split)
        if exempt_dataset is None:
            return None
        if self.args.nullspace_method != "activation":
            raise ValueError(
                "An exempt dataset needs nullspace_method='activation': a harm key is a direction of a layer's input."
            )
        columns = set(exempt_dataset.column_names)
        if not {"prompt", "harmful"} <= columns:
            raise ValueError(
                f"The exempt dataset has columns {sorted(columns)}; it needs 'prompt' and a boolean 'harmful' column "
                "(the format of GRPO's refusal-reward data): harmful prompts key the exemption, benign ones "
                "(harmful=False) are what they are told apart from."
            )
        flags = exempt_dataset["harmful"]
        if not all(isinstance(flag, bool) for flag in flags):
            raise ValueError("The exempt dataset's 'harmful' column must hold True/False for every row.")
        harmful = [index for index, flag in enumerate(flags) if flag]
        benign = [index for index, flag in enumerate(flags) if not flag]
        if not harmful:
            raise ValueError(
                "The exempt dataset has no harmful=True prompt: there is nothing to key the exemption on."
            )
        targets = find_target_linears(self.model, self.args.nullspace_target_modules)
        unmatched = [
            suffix
            for suffix in self.args.nullspace_exempt_modules
            if not any(matches_suffix(name, [suffix]) for name in targets)
        ]
        if unmatched:
            raise ValueError(
                f"nullspace_exempt_modules {unmatched} match no constrained Linear of this model (constrained Linears "
                f"look like {sorted(targets)[:4]}); name the projections whose input gives up its harm key."
            )
        prompts = exempt_dataset.select_columns(["prompt"])
        return Exemption(
            harmful=self.tokenize(prompts.select(harmful)),
            benign=self.tokenize(prompts.select(benign)) if benign else None,
            modules=list(self.args.nullspace_exempt_modules),
            ridge=self.args.nullspace_exempt_ridge,
        )

    def expected_provenance(self, weights: str) -> dict[str, Any]:
        """What a cache or checkpoint estimated from `weights` with this source's data and settings records."""
        return expected_provenance(
            self.model, self.args, self.reference_batches, weights, self.contrast_batches, self.exemption
        )

    def saved_provenance(self) -> dict[str, Any]:
        """The header a cache or checkpoint of the subspace in use is written with."""
        return saved_provenance(self.model, self.estimated_from, self.expected_provenance(self.estimated_from))

    def load_or_estimate(self) -> CapabilitySubspace:
        """The cache at `nullspace_cache_path` if it matches this model, data and settings, else an estimate
        (cached there, by the main process); the same on every process, checked."""
        subspace = self._load_or_estimate()
        self._check_same_on_every_process(subspace)
        return subspace

    def _load_or_estimate(self) -> CapabilitySubspace:
        if self.args.nullspace_refresh_steps is not None and self.reference_batches is None:
            raise ValueError("nullspace_refresh_steps needs reference data to re-estimate the subspace from.")
        weights = self.estimated_from = weights_fingerprint(self.model)
        expected = self.expected_provenance(weights)
        path = self.cache_file = resolve_cache_path(self.args.nullspace_cache_path, self.model, expected)
        if path is not None and os.path.exists(path):
            try:
                subspace = self._load_checked_cache(path, weights, expected)
            except CacheMismatchError as mismatch:
                if not self.args.nullspace_cache_overwrite:
                    raise
                logger.warning(
                    "trl-nullspace: re-estimating and replacing %s (nullspace_cache_overwrite): %s", path, mismatch
                )
            else:
                logger.info("trl-nullspace: loaded the capability subspace from %s", path)
                return subspace
        if self.reference_batches is None:
            raise ValueError(
                "No reference data for the capability subspace: pass reference_dataset=..., set "
                "nullspace_reference_dataset, or point nullspace_cache_path at an existing cache."
            )
        subspace = self._estimate_with_weights_gathered()
        self._warn_if_reference_is_tiny(subspace)
        if path is not None and self.accelerator.is_main_process:
            save_subspace(path, subspace, saved_provenance(self.model, weights, expected))
            logger.info("trl-nullspace: saved the capability subspace to %s", path)
        return subspace

    def _load_checked_cache(self, path: str, weights: str, expected: dict[str, Any]) -> CapabilitySubspace:
        """The cache at `path`, or `CacheMismatchError` if it is damaged, does not match `expected`, or
        (reused on other weights) no longer holds the reference inputs."""
        subspace, header = load_subspace(path)
        check_cache_matches(path, header, expected)
        if header.get("weights_fingerprint") != weights:  # reused on other weights (a later stage)
            self._check_reused_cache_still_fits(path, subspace)
        return subspace

    def _estimate_with_weights_gathered(self) -> CapabilitySubspace:
        """Under ZeRO-3 the activation estimate gathers one decoder layer at a time while it runs
        (`gathered_layer_by_layer`); the gradient method's backward needs the whole model gathered.
        Every process ends with the same subspace; only the main process writes the cache."""
        if self.args.nullspace_method == "gradient":
            with gathered(self.model.parameters()):
                return self.estimate()
        with gathered_layer_by_layer(self.model, self.gather_peak):
            return self.estimate()

    def _check_reused_cache_still_fits(self, path: str, subspace: CapabilitySubspace) -> None:
        """A cache reused on weights it was not estimated from (`nullspace_cache_match_weights=False`)
        protects this model only if its bases still hold the current reference inputs: after an
        unconstrained stage they need not. The rule is relative to what the estimate itself left out:
        a basis may now miss at most `REUSE_FACTOR` times that share of the reference energy, and at
        least `REUSE_FLOOR`. Measured on the tests' tiny model with a strict cache (left out: 3e-16):
        after a constrained stage the worst basis misses 5e-9 (fp32 round-off) and the next stage
        keeps the reference logits within 1e-4; after 3 plain steps at 1e-4 it misses 2e-3 and the
        next stage moves them by 0.6 (the earlier rule, 10% in absolute terms, let that through). On
        the demo's model at energy 0.99 (left out: 1%), a constrained stage leaves 5.4%."""
        if subspace.method != "activation":
            raise CacheMismatchError(
                f"{path} holds a gradient-method subspace estimated from other weights; it cannot be checked against "
                "this model's reference gradients. Re-estimate it: delete the file or point nullspace_cache_path "
                "elsewhere."
            )
        if self.reference_batches is None:
            raise CacheMismatchError(
                f"{path} was estimated from other weights (nullspace_cache_match_weights=False): pass the reference "
                "data too, so the trainer can check that the cached subspace still holds this model's reference "
                "inputs."
            )
        linears = find_target_linears(self.model, self.args.nullspace_target_modules)
        with gathered_layer_by_layer(self.model, self.gather_peak):
            shares = energy_in_span(
                self.model,
                self.reference_batches,
                linears,
                subspace,
                self.args.nullspace_normalize_tokens,
                experts=find_target_experts(self.model, self.args.nullspace_target_modules),
                statistics_budget_bytes=self.args.nullspace_statistics_budget_bytes,
            )
        worn = []
        for key, share in shares.items():
            estimated = subspace.energy_kept(key)
            left_out = 1.0 - (estimated if estimated is not None else 1.0)
            allowed = max(REUSE_FACTOR * left_out, REUSE_FLOOR)
            if 1.0 - share > allowed:
                line = (
                    f"{key}: misses {1.0 - share:.3g} of the reference energy "
                    f"(left out at estimation: {left_out:.3g}; allowed: {allowed:.3g})"
                )
                worn.append(((1.0 - share) / allowed, line))
        if worn:
            worst = [line for _, line in sorted(worn, reverse=True)[:3]]
            raise CacheMismatchError(
                f"The cached subspace {path} no longer describes this model: the reference inputs moved out of it "
                f"since it was estimated (a stage trained without the constraint?), in {len(worn)} of "
                f"{len(shares)} layer inputs; the worst:\n  " + "\n  ".join(worst) + "\nRe-estimate it from this "
                "model: delete the file or point nullspace_cache_path elsewhere."
            )

    def _warn_if_reference_is_tiny(self, subspace: CapabilitySubspace) -> None:
        """Few reference tokens cap every activation basis' rank: the constraint then protects only
        what those tokens exercise, and the general skill may still move."""
        tokens = subspace.settings.get("reference_tokens")
        if tokens is None:
            return
        capped = [key for key, basis in subspace.bases.items() if basis.shape[0] > tokens]
        if capped:
            logger.warning(
                "trl-nullspace: the reference set has only %d tokens, fewer than the input size of %d layer input(s) "
                "(e.g. %s): their subspaces are capped at rank %d and protect only what these tokens exercise. Use "
                "more general reference data (nullspace_reference_num_samples, longer examples). The defaults were "
                "measured with %d general examples (%d tokens, %.0f per input dimension of SmolLM2-135M's widest "
                "layer input; make bench-real).",
                tokens,
                len(capped),
                capped[0],
                tokens,
                *MEASURED_REFERENCE,
                MEASURED_REFERENCE[1] / MEASURED_REFERENCE_WIDEST_INPUT,
            )

    def _check_same_on_every_process(self, subspace: CapabilitySubspace) -> None:
        """Every process projects its own replica, so all must hold the same bases, bit for bit."""
        if self.accelerator.num_processes == 1:
            return
        digest = hashlib.sha256()
        for key, basis in sorted(subspace.bases.items()):
            digest.update(key.encode())
            digest.update(basis.detach().cpu().contiguous().numpy().tobytes())
        checksum = torch.tensor(
            [int.from_bytes(digest.digest()[:8], "little", signed=True)],
            dtype=torch.int64,
            device=self.accelerator.device,
        )
        if items_differing_between_ranks(checksum):
            raise RuntimeError(
                f"Processes hold different capability subspaces (this one's checksum: {checksum.item()}); their "
                "replicas would drift apart. Use one cache file for all processes (nullspace_cache_path)."
            )

    def refresh(self) -> CapabilitySubspace:
        """A new estimate from the current weights (`nullspace_refresh_steps`), which it then describes."""
        subspace = self.estimate()
        self.estimated_from = weights_fingerprint(self.model)  # collective under ZeRO-3, as the estimate
        return subspace

    def restore(self, checkpoint: str) -> tuple[CapabilitySubspace, dict[str, Any]]:
        """The subspace a checkpoint trained under and its header (anchors included), which it then describes."""
        path = os.path.join(checkpoint, CHECKPOINT_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{checkpoint} has no {CHECKPOINT_FILE}: it was not written by a null-space trainer, so the "
                "subspace and anchors it trained under are unknown. Resume from a null-space checkpoint."
            )
        subspace, header = load_subspace(path)
        check_cache_matches(path, header, {"architecture_fingerprint": architecture_fingerprint(self.model)})
        self.estimated_from = header.get("weights_fingerprint", self.estimated_from)
        return subspace, header

    def reference_description(self) -> str:
        """What the model card says the subspace was estimated from."""
        name = self.args.nullspace_reference_dataset
        batches = self.reference_batches
        if batches is None:
            return f"the cache `{self.cache_file}` (estimated before this run)"
        examples = sum(batch.input_ids.shape[0] for batch in batches)
        tokens = sum(int(batch.attention_mask.sum()) for batch in batches)
        where = f"`{name}`" if name is not None else "a dataset passed to the trainer as `reference_dataset`"
        return f"{where}, {examples} examples, {tokens} tokens"

    def estimate(self) -> CapabilitySubspace:
        """Estimate the subspace from the reference batches with the current weights.

        With several processes and the activation method, each process reads its share of the
        batches and the statistics are summed over the processes: the same bases on every process,
        from 1/world of the forward passes each (`settings["processes"]` records how many shared).
        """
        world = self.accelerator.num_processes
        batches, contrast, exemption = self.reference_batches, self.contrast_batches, self.exemption
        every_set = [batches, contrast] + ([exemption.harmful, exemption.benign] if exemption is not None else [])
        shared = (
            world > 1
            and self.args.nullspace_method == "activation"
            and all(each is None or len(each) >= world for each in every_set)
        )
        subspace = estimate_subspace(
            self.model,
            batches,
            self.args,
            not self.args.disable_tqdm,
            contrast,
            across_processes=shared,
            exemption=exemption,
        )
        subspace.settings["processes"] = world if shared else 1
        return subspace
