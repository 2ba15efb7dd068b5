"""`NullSpaceTrainerMixin`: the one place where trainers gain the capability-subspace constraint.

A null-space trainer is `class NullSpaceXTrainer(NullSpaceTrainerMixin, XTrainer)`; the mixin
 1. after the TRL trainer's own `__init__` (model loaded, PEFT applied), loads the cached subspace
    or estimates it from the reference data, binds it to the trainable parameters and freezes
    what it cannot constrain;
 2. overrides `training_step`: after `super()` has run backward, and only when gradients are
    synchronised (the last micro-batch of an optimizer step), it checks them for NaN/inf and, with
    `projection_target="gradient"`, removes their share in the subspace (measured for logged steps);
 3. with `projection_target="update"`, projects the parameters right after `optimizer.step()`
    (a `TrainerCallback.on_optimizer_step`), so what AdamW and weight decay did is projected too;
    under DeepSpeed ZeRO and FSDP2 it projects the sharded master weights instead
    (`trl_nullspace.zero`, `trl_nullspace.fsdp`; see docs/backends.md);
 4. adds `nullspace/*` metrics to the trainer's normal logs.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections import defaultdict
from typing import Any

import datasets
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import logging

from trl_nullspace import __version__
from trl_nullspace.cache import (
    check_cache_matches,
    expected_provenance,
    load_subspace,
    save_subspace,
    saved_provenance,
)
from trl_nullspace.config import NullSpaceArguments
from trl_nullspace.estimators import estimate_subspace
from trl_nullspace.fingerprint import architecture_fingerprint, model_name, weights_fingerprint
from trl_nullspace.fsdp import RowShardProjector
from trl_nullspace.projector import SubspaceProjector
from trl_nullspace.reference import (
    ReferenceBatch,
    load_reference_dataset,
    tokenize_reference,
)
from trl_nullspace.subspace import CapabilitySubspace
from trl_nullspace.zero import ZeroMasterProjector, gathered

logger = logging.get_logger(__name__)

CHECKPOINT_FILE = "nullspace_subspace.safetensors"
SETTINGS_FILE = "nullspace_config.json"


class _ProjectUpdateCallback(TrainerCallback):
    """Runs the trainer's post-step work: `update` projection and periodic re-estimation."""

    def __init__(self, trainer: NullSpaceTrainerMixin):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            print(self.trainer.nullspace_start_summary(), flush=True)
        if args.nullspace_log_per_layer:
            bases = self.trainer.nullspace_subspace.bases
            self.trainer.log({f"nullspace/rank/{key}": float(basis.shape[1]) for key, basis in bases.items()})

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._nullspace_after_optimizer_step()

    def on_step_end(self, args, state, control, **kwargs):
        refresh = self.trainer.args.nullspace_refresh_steps
        if refresh is not None and state.global_step % refresh == 0:
            self.trainer.refresh_subspace()


class NullSpaceTrainerMixin:
    """Keeps every update of a TRL trainer out of a cached capability subspace.

    Extra constructor argument: `reference_dataset` (a `datasets.Dataset` of general-capability
    data), which takes precedence over `args.nullspace_reference_dataset`. It is the data whose
    behaviour is preserved, not the reference *model* some trainers (DPO) also take.
    """

    config_class: type[NullSpaceArguments]
    args: NullSpaceArguments

    def __init__(self, *args: Any, reference_dataset: datasets.Dataset | None = None, **kwargs: Any):
        bound = inspect.signature(super().__init__).bind_partial(*args, **kwargs)
        if bound.arguments.get("args") is None:
            model = bound.arguments["model"]
            name = model if isinstance(model, str) else model_name(model)
            bound.arguments["args"] = self.config_class(output_dir=f"{name.rstrip('/').split('/')[-1]}-NullSpace")
        super().__init__(*bound.args, **bound.kwargs)
        if not isinstance(self.args, NullSpaceArguments):
            raise TypeError(
                f"{type(self).__name__} needs a config with the nullspace_* fields, e.g. "
                f"{self.config_class.__name__}; got {type(self.args).__name__}."
            )
        self._check_backend_supported()
        self._check_optimizer_supported()
        self._check_not_training_quantized_weights()
        # Per-step values since the last log; device tensors are read only when logging.
        self._nullspace_metrics: dict[str, list[float | torch.Tensor]] = defaultdict(list)
        self._reference_batches = self._load_reference_batches(reference_dataset)
        self.nullspace_subspace = self._load_or_estimate_subspace()
        self._check_same_subspace_on_every_process()
        self.nullspace_projector = self._bind(self.nullspace_subspace)
        self._freeze_or_report(self.nullspace_projector.unconstrained)
        self.add_callback(_ProjectUpdateCallback(self))
        self._tag_names = [*getattr(self, "_tag_names", []), "trl-nullspace"]
        logger.info("trl-nullspace: %s", self.nullspace_subspace.summary())

    # -- set-up ---------------------------------------------------------------------------------

    def _check_backend_supported(self) -> None:
        """Refuse the backends and options whose projection would silently not apply.

        Under DeepSpeed the engine steps the optimizer inside `backward`, before `training_step`
        returns, and under FSDP2 the gradients are row shards; for both only the `update` target
        (applied to the sharded master weights afterwards, see `trl_nullspace.zero` and
        `trl_nullspace.fsdp`) is honoured. FSDP1's flat parameters are not reached at all.
        """
        if not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            return
        backend = "DeepSpeed" if self.is_deepspeed_enabled else "FSDP"
        if self.is_fsdp_enabled and not self.accelerator.is_fsdp2:
            raise NotImplementedError(
                f"{type(self).__name__} does not support FSDP1: its flat parameters hold the weights and master "
                "copies, so the projection would silently not apply. Use fsdp_version: 2, DeepSpeed ZeRO or DDP."
            )
        if self.args.nullspace_projection_target != "update":
            raise NotImplementedError(
                f"Under {backend} the gradients are sharded (DeepSpeed also steps inside backward), so a gradient "
                "projection cannot run: use nullspace_projection_target='update' (the default), which projects the "
                "sharded master weights instead."
            )
        if self.is_fsdp_enabled and self.args.nullspace_method != "activation":
            raise NotImplementedError("Under FSDP only nullspace_method='activation' is supported yet.")
        if self.args.nullspace_refresh_steps is not None:
            raise NotImplementedError(f"nullspace_refresh_steps is not supported under {backend} yet.")

    def _check_optimizer_supported(self) -> None:
        """Refuse optimizers that would undo or bypass the projection.

        Schedule-free optimizers keep the real iterates in their state and rebuild the weights from
        them, and AnyPrecision AdamW keeps Kahan compensation buffers: both put back what the
        `update` projection removed. LOMO/AdaLomo and the layer-wise GaLore/APOLLO variants step
        inside backward, so no synchronised gradient is ever seen for the `gradient` target.
        """
        optim = str(getattr(self.args.optim, "value", self.args.optim))
        if self.args.nullspace_projection_target == "update" and (
            optim.startswith("schedule_free") or optim == "adamw_anyprecision"
        ):
            raise ValueError(
                f"optim={optim!r} keeps its own copy of the weights' trajectory in its state, which would restore "
                "what nullspace_projection_target='update' removes after each step. Use adamw_torch (or another "
                "optimizer that updates the weights in place)."
            )
        if optim in ("lomo", "adalomo"):
            raise ValueError(
                f"optim={optim!r} updates the weights during backward, without an optimizer step the projection "
                "can follow. Use adamw_torch (or another optimizer with a step)."
            )
        if self.args.nullspace_projection_target == "gradient" and optim.endswith("_layerwise"):
            raise ValueError(
                f"optim={optim!r} steps each layer inside backward, before nullspace_projection_target='gradient' "
                "could project its gradient. Use the update target (the default) or a non-layer-wise optimizer."
            )

    def _check_not_training_quantized_weights(self) -> None:
        """Quantized weights cannot be updated or projected; only adapters on top of them can (QLoRA)."""
        quantized = getattr(self.model, "hf_quantizer", None) is not None or getattr(self.model, "is_quantized", False)
        if not quantized:
            return
        base_trainable = [
            name
            for name, parameter in self.model.named_parameters()
            if parameter.requires_grad and "lora_" not in name
        ]
        if base_trainable or self.args.nullspace_method != "activation":
            raise ValueError(
                "The model's base weights are quantized: they cannot be projected or trained directly. Train LoRA "
                "adapters on them (pass peft_config, QLoRA-style) with nullspace_method='activation'; trainable "
                f"non-adapter parameters found: {base_trainable[:3]}."
            )

    def _reference_tokenizer(self) -> PreTrainedTokenizerBase:
        """The text tokenizer, also when the processing class is a multimodal processor."""
        if isinstance(self.processing_class, PreTrainedTokenizerBase):
            return self.processing_class
        return self.processing_class.tokenizer

    def _load_reference_batches(self, reference_dataset: datasets.Dataset | None) -> list[ReferenceBatch] | None:
        if reference_dataset is None and self.args.nullspace_reference_dataset is not None:
            reference_dataset = load_reference_dataset(
                self.args.nullspace_reference_dataset, self.args.nullspace_reference_split
            )
        if reference_dataset is None:
            return None
        return tokenize_reference(
            reference_dataset,
            self._reference_tokenizer(),
            batch_size=self.args.nullspace_reference_batch_size,
            max_length=self.args.nullspace_reference_max_length,
            num_samples=self.args.nullspace_reference_num_samples,
        )

    def _expected_provenance(self, weights: str) -> dict[str, Any]:
        return expected_provenance(self.model, self.args, self._reference_batches, weights)

    def _load_or_estimate_subspace(self) -> CapabilitySubspace:
        if self.args.nullspace_refresh_steps is not None and self._reference_batches is None:
            raise ValueError("nullspace_refresh_steps needs reference data to re-estimate the subspace from.")
        path = self.args.nullspace_cache_path
        weights = weights_fingerprint(self.model)
        expected = self._expected_provenance(weights)
        if path is not None and os.path.exists(path):
            subspace, header = load_subspace(path)
            check_cache_matches(path, header, expected)
            logger.info("trl-nullspace: loaded the capability subspace from %s", path)
            return subspace
        if self._reference_batches is None:
            raise ValueError(
                "No reference data for the capability subspace: pass reference_dataset=..., set "
                "nullspace_reference_dataset, or point nullspace_cache_path at an existing cache."
            )
        # Every process estimates from the same full reference set and weights, so all hold the same
        # subspace without communication; only the main process writes the cache.
        with gathered(self.model.parameters()):
            subspace = self.estimate_subspace()
        self._warn_if_reference_is_tiny(subspace)
        if path is not None and self.is_world_process_zero():
            save_subspace(path, subspace, saved_provenance(self.model, weights, expected))
            logger.info("trl-nullspace: saved the capability subspace to %s", path)
        return subspace

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
                "more general reference data (nullspace_reference_num_samples, longer examples).",
                tokens,
                len(capped),
                capped[0],
                tokens,
            )

    def _check_same_subspace_on_every_process(self) -> None:
        """Every process projects its own replica, so all must hold the same bases, bit for bit."""
        if self.accelerator.num_processes == 1:
            return
        digest = hashlib.sha256()
        for key, basis in sorted(self.nullspace_subspace.bases.items()):
            digest.update(key.encode())
            digest.update(basis.detach().cpu().contiguous().numpy().tobytes())
        checksum = torch.tensor(
            [int.from_bytes(digest.digest()[:8], "little", signed=True)],
            dtype=torch.int64,
            device=self.accelerator.device,
        )
        gathered = self.accelerator.gather(checksum)
        if not torch.all(gathered == gathered[0]):
            raise RuntimeError(
                f"Processes hold different capability subspaces (checksums {gathered.tolist()}); their replicas "
                "would drift apart. Use one cache file for all processes (nullspace_cache_path)."
            )

    def estimate_subspace(self) -> CapabilitySubspace:
        """Estimate the subspace from the reference batches with the current weights."""
        return estimate_subspace(self.model, self._reference_batches, self.args, not self.args.disable_tqdm)

    def _bind(self, subspace: CapabilitySubspace) -> SubspaceProjector:
        projector = SubspaceProjector.bind(
            self.model, subspace, compute_dtype=getattr(torch, self.args.nullspace_projection_dtype)
        )
        projector.check_trainable_directions()
        # ZeRO-3 may have partitioned the weights already (zero.Init): anchors need them whole once.
        with gathered([item.parameter for item in projector.constrained], modifier_rank=0):
            projector.initialise_anchors(track_updates=self.args.nullspace_projection_target == "update")
        self._sharded_master_projector: ZeroMasterProjector | RowShardProjector | None = None
        return projector

    def _sharded_projector(self) -> ZeroMasterProjector | RowShardProjector:
        """The projector of sharded master weights, built once DeepSpeed or FSDP2 has sharded them."""
        if self._sharded_master_projector is None:
            constrained = self.nullspace_projector.constrained
            if self.is_deepspeed_enabled:
                self._sharded_master_projector = ZeroMasterProjector(constrained, self.accelerator.device)
            else:
                self._sharded_master_projector = RowShardProjector(self.model, constrained)
        return self._sharded_master_projector

    def _freeze_or_report(self, unconstrained: list[str]) -> None:
        if not unconstrained:
            return
        if self.args.nullspace_freeze_untargeted:
            parameters = dict(self.model.named_parameters())
            for name in unconstrained:
                parameters[name].requires_grad_(False)
            logger.info("trl-nullspace: froze %d parameters outside the constraint", len(unconstrained))
        else:
            logger.warning(
                "trl-nullspace: %d trainable parameters are NOT constrained (nullspace_freeze_untargeted=False) "
                "and may change reference outputs: %s",
                len(unconstrained),
                unconstrained[:8],
            )

    def refresh_subspace(self) -> None:
        """Re-estimate from the current weights and re-anchor (`nullspace_refresh_steps`)."""
        self.nullspace_subspace = self.estimate_subspace()
        self.nullspace_projector = self._bind(self.nullspace_subspace)

    # -- what the run reports and saves ---------------------------------------------------------

    def nullspace_settings(self) -> dict[str, Any]:
        """The constraint this run trains under: saved next to the model and in its card."""
        ranks = [basis.shape[1] for basis in self.nullspace_subspace.bases.values()]
        return {
            "library": f"trl-nullspace {__version__}",
            "method": self.nullspace_subspace.method,
            "projection_target": self.args.nullspace_projection_target,
            "projection_dtype": self.args.nullspace_projection_dtype,
            "rank_selection": self.args.nullspace_rank_selection.to_dict(),
            "target_modules": self.args.nullspace_target_modules,
            "bases": len(ranks),
            "rank_min": min(ranks),
            "rank_max": max(ranks),
            "constrained_parameters": len(self.nullspace_projector.constrained),
            "unconstrained_parameters": len(self.nullspace_projector.unconstrained),
            "unconstrained_frozen": self.args.nullspace_freeze_untargeted,
            "subspace_mib": round(self.nullspace_subspace.num_bytes() / 2**20, 3),
            "cache_path": self.args.nullspace_cache_path,
        }

    def nullspace_start_summary(self) -> str:
        """One line printed when training starts, so the constraint is visible in every run's log."""
        settings = self.nullspace_settings()
        others = "frozen" if settings["unconstrained_frozen"] else "train UNCONSTRAINED"
        summary = (
            f"trl-nullspace: {settings['method']} subspace, {settings['projection_target']} projection; "
            f"{settings['bases']} bases of rank {settings['rank_min']}–{settings['rank_max']} "
            f"({settings['subspace_mib']} MiB) constrain {settings['constrained_parameters']} weights; "
            f"{settings['unconstrained_parameters']} other parameters {others}."
        )
        if self.is_deepspeed_enabled:  # the engine exists once training begins
            summary += f" {self._sharded_projector().summary()}."
        return summary

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save as TRL does, plus `nullspace_config.json`: the constraint the weights were trained under."""
        super().save_model(output_dir, _internal_call)
        if self.is_world_process_zero():
            path = os.path.join(output_dir or self.args.output_dir, SETTINGS_FILE)
            with open(path, "w") as handle:
                json.dump(self.nullspace_settings(), handle, indent=2)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """TRL's card (tagged `trl-nullspace`) with a section stating the constraint's settings."""
        super().create_model_card(*args, **kwargs)
        path = os.path.join(self.args.output_dir, "README.md")
        if self.is_world_process_zero() and os.path.exists(path):
            lines = [f"- {key}: `{value}`" for key, value in self.nullspace_settings().items()]
            with open(path, "a") as handle:
                handle.write("\n## Null-space constraint (trl-nullspace)\n\n" + "\n".join(lines) + "\n")

    # -- checkpoints ------------------------------------------------------------------------------

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Save the subspace in use and its anchors next to the weights, so resuming is exact."""
        super()._save_checkpoint(model, trial)
        weights = weights_fingerprint(self.model)  # collective under ZeRO-3: every rank computes it
        if not self.is_world_process_zero():
            return
        folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        save_subspace(
            os.path.join(folder, CHECKPOINT_FILE),
            self.nullspace_subspace,
            saved_provenance(self.model, weights, self._expected_provenance(weights)),
            anchors=self.nullspace_projector.anchors(),
        )

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """Restore the checkpoint's subspace and anchors first, then let TRL resume.

        Done before TRL's own loop for every backend: under DeepSpeed and FSDP the Trainer loads
        the checkpoint only after sharding the model, where the anchors could no longer be bound.
        """
        if resume_from_checkpoint:
            path = resume_from_checkpoint
            if not isinstance(path, str):
                path = get_last_checkpoint(self.args.output_dir)
            if path is not None:
                self._restore_subspace_from_checkpoint(path)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _restore_subspace_from_checkpoint(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, CHECKPOINT_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{checkpoint} has no {CHECKPOINT_FILE}: it was not written by a null-space trainer, so the "
                "subspace and anchors it trained under are unknown. Resume from a null-space checkpoint."
            )
        subspace, header = load_subspace(path)
        check_cache_matches(path, header, {"architecture_fingerprint": architecture_fingerprint(self.model)})
        self.nullspace_subspace = subspace
        self.nullspace_projector = self._bind(subspace)
        self.nullspace_projector.restore_anchors(header["anchors"])

    # -- training ---------------------------------------------------------------------------------

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Under DeepSpeed the engine has already stepped and released the gradients here; under
        # FSDP2 they are row shards of new parameter objects. Both check the weights after the step.
        if self.accelerator.sync_gradients and not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            self._constrain_gradients()
        return loss

    def _constrain_gradients(self) -> None:
        projector = self.nullspace_projector
        nonfinite = projector.nonfinite_gradients()
        if nonfinite and getattr(self.accelerator, "scaler", None) is None:
            raise FloatingPointError(
                f"NaN or inf gradients at optimizer step {self.state.global_step} in {nonfinite[:3]}: projecting "
                "them would spread the NaN. Lower the learning rate or check the batch; saved checkpoints are intact."
            )
        apply = self.args.nullspace_projection_target == "gradient"
        if not apply and not self._step_will_be_logged():
            return  # under the update target the gradient is only measured, for the steps that are logged
        stats = projector.gradient_stats(apply=apply)
        self._nullspace_metrics["removed_frac"].append(stats.removed_fraction)
        if self.args.nullspace_log_per_layer:
            for name, fraction in stats.per_parameter_fractions().items():
                self._nullspace_metrics[f"removed_frac/{name}"].append(fraction)

    def _step_will_be_logged(self) -> bool:
        """Whether the optimizer step now being taken ends with a log (the Trainer's own rule)."""
        step = self.state.global_step + 1
        if self.args.logging_strategy != "steps":
            return True
        return step % self.state.logging_steps == 0 or (step == 1 and self.args.logging_first_step)

    def _nullspace_after_optimizer_step(self) -> None:
        if self.args.nullspace_projection_target != "update":
            return
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            removed = self._sharded_projector().enforce_anchors()
        else:
            removed = self.nullspace_projector.enforce_anchors()
        self._nullspace_metrics["update_removed_norm"].append(removed)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._nullspace_metrics:
            for key, values in self._nullspace_metrics.items():
                logs[f"nullspace/{key}"] = float(sum(values) / len(values))
            self._nullspace_metrics.clear()
        super().log(logs, start_time)
