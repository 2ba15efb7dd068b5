"""`NullSpaceTrainerMixin`: the one place where trainers gain the capability-subspace constraint.

A null-space trainer is `class NullSpaceXTrainer(NullSpaceTrainerMixin, XTrainer)`; the mixin
 1. after the TRL trainer's own `__init__` (model loaded, PEFT applied), loads the cached subspace
    or estimates it from the reference data (`trl_nullspace.training.subspace_setup`), binds it to the
    trainable parameters and freezes what it cannot constrain;
 2. overrides `training_step`: after `super()` has run backward, and only when gradients are
    synchronised (the last micro-batch of an optimizer step), it checks them for NaN/inf and, with
    `projection_target="gradient"`, removes their share in the subspace (measured for logged steps);
 3. with `projection_target="update"`, projects the parameters right after `optimizer.step()`
    (a `TrainerCallback.on_optimizer_step`), so what AdamW and weight decay did is projected too;
    every projection runs through the backend detected once at set-up (`trl_nullspace.backends`:
    one process/DDP, DeepSpeed ZeRO's or FSDP2's sharded masters; see docs/backends.md);
 4. adds `nullspace/*` metrics to the trainer's normal logs.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from collections import defaultdict
from typing import Any

import datasets
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import logging

from trl_nullspace._version import __version__
from trl_nullspace.backends.base import ConstraintBackend
from trl_nullspace.backends.node_memory import share_on_node
from trl_nullspace.backends.selection import backend_for
from trl_nullspace.backends.zero.gather import GatherPeak, gathered_alone
from trl_nullspace.config import NullSpaceArguments
from trl_nullspace.data.loading import load_dataset_from
from trl_nullspace.estimation.reference import tokenize_reference
from trl_nullspace.estimation.subspace import CapabilitySubspace
from trl_nullspace.projection.projector import SubspaceProjector
from trl_nullspace.storage.cache import (
    check_cache_matches,
    load_subspace,
    save_linked,
    saved_provenance,
)
from trl_nullspace.storage.fingerprint import architecture_fingerprint, model_name, weights_fingerprint
from trl_nullspace.training import guards
from trl_nullspace.training.approximations import warn_approximations
from trl_nullspace.training.learning_rate import LearningRateScaler, rate_note
from trl_nullspace.training.model_card import constraint_section
from trl_nullspace.training.monitor import CapabilityDriftMonitor
from trl_nullspace.training.subspace_setup import SubspaceSetupMixin

logger = logging.get_logger(__name__)

CHECKPOINT_FILE = "nullspace_subspace.safetensors"
# In the output folder: one file per distinct (subspace, anchors) that checkpoints link to.
CHECKPOINT_STORE = "nullspace_subspaces"
SETTINGS_FILE = "nullspace_config.json"
RATE_SCALE_FILE = "nullspace_learning_rate.json"  # `nullspace_scale_learning_rate`'s calibration, per checkpoint


class _ProjectUpdateCallback(TrainerCallback):
    """Runs the trainer's post-step work: `update` projection and periodic re-estimation."""

    def __init__(self, trainer: NullSpaceTrainerMixin):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.trainer._check_optimizer(optimizer)
        self.trainer.nullspace_backend.begin_training(self.trainer.model)
        self.trainer._take_previous()
        if state.is_world_process_zero:
            # The Trainer's progress bar is already drawn: tqdm.write clears it, prints, and redraws it,
            # so the summary gets lines of its own instead of landing inside the bar's.
            tqdm.write(self.trainer.nullspace_start_summary(), file=sys.stdout)
        if args.nullspace_log_per_layer:
            bases = self.trainer.nullspace_subspace.bases
            self.trainer.log({f"nullspace/rank/{key}": float(basis.shape[1]) for key, basis in bases.items()})

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._nullspace_after_optimizer_step()

    def on_step_end(self, args, state, control, **kwargs):
        refresh = self.trainer.args.nullspace_refresh_steps
        if refresh is not None and state.global_step % refresh == 0:
            self.trainer.refresh_subspace()


class NullSpaceTrainerMixin(SubspaceSetupMixin):
    """Keeps every update of a TRL trainer out of a cached capability subspace.

    Extra constructor arguments: `reference_dataset` (a `datasets.Dataset` of general-capability
    data), which takes precedence over `args.nullspace_reference_dataset`. It is the data whose
    behaviour is preserved, not the reference *model* some trainers (DPO) also take.
    `monitor_dataset` (held-out general data; over `args.nullspace_monitor_dataset`) turns on the
    live drift metrics of `trl_nullspace.training.monitor`. `exempt_dataset` (prompts with a boolean `harmful`
    column; over `args.nullspace_exempt_dataset`) frees each exempted layer input's harm key
    (`trl_nullspace.estimation.exemption`). `contrast_dataset` (over `args.nullspace_contrast_dataset`)
    is what `nullspace_contrastive` contrasts the reference data with, instead of the training data.
    """

    config_class: type[NullSpaceArguments]
    args: NullSpaceArguments

    def __init__(
        self,
        *args: Any,
        reference_dataset: datasets.Dataset | None = None,
        monitor_dataset: datasets.Dataset | None = None,
        exempt_dataset: datasets.Dataset | None = None,
        contrast_dataset: datasets.Dataset | None = None,
        **kwargs: Any,
    ):
        bound = inspect.signature(super().__init__).bind_partial(*args, **kwargs)
        given = bound.arguments.get("args")
        trl_config = self.config_class.__bases__[-1]  # NullSpaceSFTConfig(NullSpaceArguments, SFTConfig): SFTConfig
        if given is None:
            model = bound.arguments["model"]
            name = model if isinstance(model, str) else model_name(model)
            bound.arguments["args"] = self.config_class(output_dir=f"{name.rstrip('/').split('/')[-1]}-NullSpace")
        elif not isinstance(given, NullSpaceArguments) and isinstance(given, trl_config):
            # A drop-in takes TRL's own config: every setting kept, the constraint at its defaults.
            bound.arguments["args"] = self.config_class.from_trl_config(given)
            logger.info("trl-nullspace: %s given; the nullspace_* settings take their defaults", type(given).__name__)
        elif not isinstance(given, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__} (or TRL's {trl_config.__name__}, "
                f"taken with the null-space defaults); got {type(given).__name__}."
            )
        # The training data as the user passed it, before TRL tokenises it: the contrastive rule's default data.
        self._raw_train_dataset = bound.arguments.get("train_dataset")
        super().__init__(*bound.args, **bound.kwargs)
        # Where the projections run (one process/DDP, DeepSpeed ZeRO, FSDP2): detected once, checked now.
        self.nullspace_backend: ConstraintBackend = backend_for(
            self.args, self.accelerator, self.model, type(self).__name__
        )
        guards.check_optimizer_name(self.args)
        guards.check_quantized(self.model, self.args)
        guards.check_adapters(self.model)
        # Per-step values since the last log; device tensors are read only when logging.
        self._nullspace_metrics: dict[str, list[float | torch.Tensor]] = defaultdict(list)
        self._nullspace_frozen: list[str] = []
        self._nullspace_rate_scaler = LearningRateScaler() if self.args.nullspace_scale_learning_rate else None
        # What the set-up gathers under ZeRO-3 (estimate, anchors), at most, at once; None otherwise.
        self._nullspace_gather_peak = GatherPeak.of(self.model)
        self._reference_batches = self._load_reference_batches(reference_dataset)
        self._contrast_batches = self._load_contrast_batches(contrast_dataset)
        self._exemption = self._load_exemption(exempt_dataset)
        self.nullspace_subspace = self._load_or_estimate_subspace()
        self._check_same_subspace_on_every_process()
        self.nullspace_projector = self._bind(self.nullspace_subspace)
        self._freeze_or_report(self.nullspace_projector.unconstrained)
        warn_approximations(
            self.args, self.nullspace_subspace, [item.parameter for item in self.nullspace_projector.constrained]
        )
        self.add_callback(_ProjectUpdateCallback(self))
        self._add_drift_monitor(monitor_dataset)
        self._tag_names = [*getattr(self, "_tag_names", []), "trl-nullspace"]
        logger.info("trl-nullspace: %s", self.nullspace_subspace.summary())

    # -- set-up ---------------------------------------------------------------------------------

    def _add_drift_monitor(self, monitor_dataset: datasets.Dataset | None) -> None:
        """Log drift on held-out general data while training (`trl_nullspace.training.monitor`), if asked."""
        if monitor_dataset is None and self.args.nullspace_monitor_dataset is not None:
            monitor_dataset = load_dataset_from(self.args.nullspace_monitor_dataset, self.args.nullspace_monitor_split)
        if monitor_dataset is None:
            return
        batches = tokenize_reference(
            monitor_dataset,
            self._reference_tokenizer(),
            batch_size=self.args.nullspace_reference_batch_size,
            max_length=self.args.nullspace_reference_max_length,
            num_samples=self.args.nullspace_monitor_num_samples,
        )
        steps = self.args.nullspace_monitor_steps or int(self.args.eval_steps or self.args.logging_steps)
        self.add_callback(CapabilityDriftMonitor(self, batches, steps))

    def _bind(self, subspace: CapabilitySubspace) -> SubspaceProjector:
        if self.args.nullspace_offload:  # an estimate made on the accelerator would otherwise stay there
            subspace.bases = {key: basis.cpu() for key, basis in subspace.bases.items()}
        projector = SubspaceProjector.bind(
            self.model,
            subspace,
            compute_dtype=getattr(torch, self.args.nullspace_projection_dtype),
            offload_block_bytes=self.args.nullspace_offload_block_bytes,
            smaller_storage=self.args.nullspace_basis_storage == "smaller",
            share_host=share_on_node if self.args.nullspace_offload_share_node else None,
        )
        projector = self.nullspace_backend.supported(projector)  # the rest frozen, with a warning
        projector.check_trainable_directions()
        # ZeRO-3 may have partitioned the weights already (zero.Init): each is gathered in turn.
        target = self.args.nullspace_projection_target
        peak = self._nullspace_gather_peak
        projector.initialise_anchors(
            track_updates=target in ("update", "both"),
            around=lambda parameter: gathered_alone(parameter, peak, modifier_rank=0),
        )
        self.nullspace_backend.bind(projector)
        return projector

    def _check_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """The optimizer must step what is projected (`guards.check_optimizer_steps_what_is_constrained`),
        where it steps the module's parameters at all (not under DeepSpeed or FSDP2: their shards'
        projectors map every constrained weight to the optimizer's copies themselves, or fail)."""
        if optimizer is None or not self.nullspace_backend.optimizer_steps_module_parameters:
            return
        projector = self.nullspace_projector
        allowed = set(projector.free)
        if not self.args.nullspace_freeze_untargeted:
            allowed |= set(projector.unconstrained)
        guards.check_optimizer_steps_what_is_constrained(
            optimizer,
            {item.name: item.parameter for item in projector.constrained},
            allowed,
            dict(self.model.named_parameters()),
        )

    def _freeze_or_report(self, unconstrained: list[str]) -> None:
        if not unconstrained:
            return
        if self.args.nullspace_freeze_untargeted:
            parameters = dict(self.model.named_parameters())
            self._nullspace_frozen = sorted(unconstrained)
            for name in unconstrained:
                parameters[name].requires_grad_(False)
            logger.info("trl-nullspace: froze %d parameters outside the constraint", len(unconstrained))
            # Big matrices frozen are capacity the safety update cannot use: say so, not only count them.
            # Fused experts are constrained by the activation method on one process or DDP only; other
            # layouts, and routers beside them, are frozen.
            large = [name for name in self._nullspace_frozen if parameters[name].dim() >= 3 or ".mlp.gate." in name]
            if large:
                logger.warning(
                    "trl-nullspace: %d mixture-of-experts parameters are frozen, not constrained (e.g. %s): experts "
                    "are constrained only in the layouts of Mixtral, Qwen2/3-MoE and GPT-OSS, with the activation "
                    "method, on one process or DDP (docs/architectures.md). The safety update trains the rest.",
                    len(large),
                    large[:3],
                )
        else:
            logger.warning(
                "trl-nullspace: %d trainable parameters are NOT constrained (nullspace_freeze_untargeted=False) "
                "and may change reference outputs: %s",
                len(unconstrained),
                unconstrained[:8],
            )

    def _take_previous(self) -> None:
        """With complement bases, record the weights the first `update` projection keeps the change
        from: once the model is sharded (each rank its rows) and a resumed checkpoint is loaded."""
        if self.args.nullspace_projection_target == "gradient" or self.args.nullspace_basis_storage == "basis":
            return
        self.nullspace_backend.take_previous()

    def refresh_subspace(self) -> None:
        """Re-estimate from the current weights and re-anchor (`nullspace_refresh_steps`)."""
        self.nullspace_subspace = self.estimate_subspace()
        self._nullspace_estimated_from = weights_fingerprint(self.model)  # collective under ZeRO-3, as the estimate
        self.nullspace_projector = self._bind(self.nullspace_subspace)
        self._take_previous()

    # -- what the run reports and saves ---------------------------------------------------------

    def nullspace_settings(self) -> dict[str, Any]:
        """The constraint this run trains under: saved next to the model and in its card."""
        subspace = self.nullspace_subspace
        ranks = [basis.shape[1] for basis in subspace.bases.values()]
        kept = {key: subspace.energy_kept(key) for key in subspace.bases}
        known = {key: value for key, value in kept.items() if value is not None}
        least = min(known, key=known.get) if known else None
        frozen = self.args.nullspace_freeze_untargeted
        exempted: dict[str, float] = subspace.settings.get("exempted", {})
        activation = subspace.method == "activation"
        return {
            "library": f"trl-nullspace {__version__}",
            "method": self.nullspace_subspace.method,
            "projection_target": self.args.nullspace_projection_target,
            "projection_dtype": self.args.nullspace_projection_dtype,
            "offload": self.args.nullspace_offload,
            "offload_shared_on_node": any(item.shared.node_shared for item in self.nullspace_projector.constrained),
            "basis_storage": self.args.nullspace_basis_storage,
            "weights_with_complements": sum(item.shared.complement for item in self.nullspace_projector.constrained),
            "rank_selection": self.args.nullspace_rank_selection.to_dict(),
            "target_modules": self.args.nullspace_target_modules,
            "bases": len(ranks),
            "rank_min": min(ranks),
            "rank_max": max(ranks),
            "normalize_tokens": self.args.nullspace_normalize_tokens,
            "contrastive": self.args.nullspace_contrastive,
            # The harm-keyed exemption: per exempted layer input, the reference energy its basis gave up.
            "exempted_inputs": len(exempted),
            "exempted_energy_max": round(max(exempted.values()), 6) if exempted else None,
            "exempted_energy_max_basis": max(exempted, key=exempted.get) if exempted else None,
            "energy_protected_mean": round(sum(known.values()) / len(known), 6) if known else None,
            "energy_protected_least": round(known[least], 6) if known else None,
            "energy_protected_least_basis": least,
            # RMS share of a reference token's layer input outside the protected span, at the least-protected
            # basis: a layer's reference outputs move by at most ‖ΔW‖·residual·‖x‖ (activation method).
            "reference_residual_max": subspace.residual(least) if known and activation else None,
            "constrained_parameters": len(self.nullspace_projector.constrained),
            # Counted when they were frozen: a resumed run binds again after they already are.
            "unconstrained_parameters": len(self._nullspace_frozen)
            if frozen
            else len(self.nullspace_projector.unconstrained),
            "unconstrained_frozen": frozen,
            "subspace_mib": round(self.nullspace_subspace.num_bytes() / 2**20, 3),
            "cache_path": self.nullspace_cache_file,
        }

    def nullspace_start_summary(self) -> str:
        """One line printed when training starts, so the constraint is visible in every run's log."""
        settings = self.nullspace_settings()
        others = "frozen" if settings["unconstrained_frozen"] else "train UNCONSTRAINED"
        where = ""
        if settings["offload"]:
            where = ", in host memory" + (", one copy per node" if settings["offload_shared_on_node"] else "")
        complements = ""
        if settings["basis_storage"] == "smaller":
            complements = f" ({settings['weights_with_complements']} through their bases' complements)"
        summary = (
            f"trl-nullspace: {settings['method']} subspace, {settings['projection_target']} projection; "
            f"{settings['bases']} bases of rank {settings['rank_min']}–{settings['rank_max']} "
            f"({settings['subspace_mib']} MiB{where}) "
            f"constrain {settings['constrained_parameters']} weights"
            f"{complements}; "
            f"{settings['unconstrained_parameters']} other parameters {others}."
        )
        if settings["energy_protected_mean"] is not None:
            summary += (
                f" The bases hold {settings['energy_protected_mean']:.2%} of the reference data's "
                f"{'gradient' if settings['method'] == 'gradient' else 'layer-input'} energy on average "
                f"(least {settings['energy_protected_least']:.2%}, {settings['energy_protected_least_basis']}); "
                "updates may move reference outputs only through the rest"
            )
            residual = settings["reference_residual_max"]
            summary += (
                "."
                if residual is None
                else f": at most {residual:.2g} of a reference input's size (RMS) lies "
                "outside the protected span, so a layer's reference outputs move by at most ‖ΔW‖ times that."
            )
        if settings["exempted_inputs"]:
            summary += (
                f" Harm keys exempted at {settings['exempted_inputs']} layer inputs: each basis gave up at most "
                f"{settings['exempted_energy_max']:.3%} of its reference energy "
                f"({settings['exempted_energy_max_basis']}), through which reference outputs may move."
            )
        peak = self._nullspace_gather_peak
        if peak is not None:
            summary += (
                f" The set-up gathered at most {peak.peak} of {peak.total} weight values at once "
                f"({peak.peak / peak.total:.0%}; ZeRO-3: the estimate layer by layer, the anchors weight by weight)."
            )
        summary += rate_note(self.args.learning_rate, scaled=self._nullspace_rate_scaler is not None)
        summary += self.nullspace_backend.summary()  # e.g. where DeepSpeed's projections run, built as training begins
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
            with open(path, "a") as handle:
                handle.write("\n" + constraint_section(self.nullspace_settings(), self._reference_description()))

    def _reference_description(self) -> str:
        """What the card says the subspace was estimated from."""
        name = self.args.nullspace_reference_dataset
        batches = self._reference_batches
        if batches is None:
            return f"the cache `{self.nullspace_cache_file}` (estimated before this run)"
        examples = sum(batch.input_ids.shape[0] for batch in batches)
        tokens = sum(int(batch.attention_mask.sum()) for batch in batches)
        where = f"`{name}`" if name is not None else "a dataset passed to the trainer as `reference_dataset`"
        return f"{where}, {examples} examples, {tokens} tokens"

    # -- checkpoints ------------------------------------------------------------------------------

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Save the subspace in use and its anchors next to the weights, so resuming is exact: one
        copy per run in `CHECKPOINT_STORE` (per refresh), each checkpoint's file a hard link to it
        (`cache.save_linked`)."""
        super()._save_checkpoint(model, trial)
        anchors = self.nullspace_backend.anchors_at_save()  # a collective where each rank keeps its rows only
        if not self.is_world_process_zero():
            return
        output_dir = self._get_output_dir(trial)
        folder = os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        weights = self._nullspace_estimated_from
        save_linked(
            os.path.join(folder, CHECKPOINT_FILE),
            os.path.join(output_dir, CHECKPOINT_STORE),
            self.nullspace_subspace,
            saved_provenance(self.model, weights, self._expected_provenance(weights)),
            anchors=anchors,
        )
        if self._nullspace_rate_scaler is not None:
            with open(os.path.join(folder, RATE_SCALE_FILE), "w") as handle:
                json.dump(self._nullspace_rate_scaler.state_dict(), handle)

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

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """The Trainer's load, then the weights it skips (fused experts saved per expert:
        `checkpoint_weights`), so a resumed run continues from the weights it stopped at."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = self.model if model is None else model
        if hasattr(model, "peft_config"):
            return
        reloaded = self.nullspace_backend.reload_converted_weights(model, resume_from_checkpoint)
        if reloaded:
            logger.info(
                "trl-nullspace: restored %d weights saved in another layout (e.g. %s)", len(reloaded), reloaded[0]
            )

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
        self._nullspace_estimated_from = header.get("weights_fingerprint", self._nullspace_estimated_from)
        self.nullspace_projector = self._bind(subspace)
        self.nullspace_projector.restore_anchors(header["anchors"])
        rate_scale = os.path.join(checkpoint, RATE_SCALE_FILE)
        if self._nullspace_rate_scaler is not None and os.path.exists(rate_scale):
            with open(rate_scale) as handle:
                self._nullspace_rate_scaler.load_state_dict(json.load(handle))

    # -- training ---------------------------------------------------------------------------------

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:  # the last micro-batch of an optimizer step
            self._constrain_gradients()
        return loss

    def _constrain_gradients(self) -> None:
        """The backend's gradient moment (`ConstraintBackend.before_step`), and what it measured."""
        scaler = self._nullspace_rate_scaler
        calibrating = scaler is not None and scaler.calibrating
        measure = calibrating or self._step_will_be_logged()
        stats = self.nullspace_backend.before_step(self.model, self.state.global_step, measure)
        if stats is None:
            return
        self._nullspace_metrics["removed_frac"].append(stats.removed_fraction)
        if scaler is not None:
            scaler.observe(stats.removed_fraction, self.optimizer, self.lr_scheduler)
            self._nullspace_metrics["lr_scale"].append(scaler.scale)
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
        removed = self.nullspace_backend.after_step()
        if removed is not None:
            self._nullspace_metrics["update_removed_norm"].append(removed)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._nullspace_metrics:
            for key, values in self._nullspace_metrics.items():
                logs[f"nullspace/{key}"] = float(sum(values) / len(values))
            self._nullspace_metrics.clear()
        super().log(logs, start_time)
