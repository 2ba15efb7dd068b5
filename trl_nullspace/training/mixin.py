"""`NullSpaceTrainerMixin`: the one place where trainers gain the capability-subspace constraint.

A null-space trainer is `class NullSpaceXTrainer(NullSpaceTrainerMixin, XTrainer)`. The mixin is
thin: after the TRL trainer's own `__init__` (model loaded, PEFT applied) it builds one
`CapabilityConstraint` (`trl_nullspace.training.constraint`: the subspace's source, the bound
projector, the backend detected once, the step metrics) as `trainer.nullspace`, and overrides only
the Trainer hooks where the constraint acts:
 1. `training_step`: after `super()` has run backward, and only when gradients are synchronised
    (the last micro-batch of an optimizer step), the constraint's gradient moment;
 2. a `TrainerCallback`: as training begins, after every `optimizer.step()` (the `update`
    projection, so what AdamW and weight decay did is projected too) and, with
    `nullspace_refresh_steps`, a re-estimate;
 3. `log`: the `nullspace/*` metrics join the trainer's normal logs;
 4. `save_model`, `create_model_card`, `_save_checkpoint`, `train` and `_load_from_checkpoint`: the
    constraint is saved beside the weights and restored before a resumed run's loop.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from typing import Any

import datasets
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import logging

from trl_nullspace.backends.selection import backend_for
from trl_nullspace.config import NullSpaceArguments
from trl_nullspace.data.loading import load_dataset_from
from trl_nullspace.estimation.subspace import CapabilitySubspace
from trl_nullspace.storage.fingerprint import model_name
from trl_nullspace.training import guards
from trl_nullspace.training.constraint import CapabilityConstraint
from trl_nullspace.training.model_card import constraint_section
from trl_nullspace.training.monitor import CapabilityDriftMonitor
from trl_nullspace.training.report import constraint_settings, start_summary
from trl_nullspace.training.source import SubspaceSource

logger = logging.get_logger(__name__)

SETTINGS_FILE = "nullspace_config.json"


class _ConstraintCallback(TrainerCallback):
    """The constraint's moments that the Trainer announces through callbacks."""

    def __init__(self, trainer: NullSpaceTrainerMixin):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        trainer = self.trainer
        trainer.nullspace.begin_training(trainer.model, optimizer)
        if state.is_world_process_zero:
            # The Trainer's progress bar is already drawn: tqdm.write clears it, prints, and redraws it,
            # so the summary gets lines of its own instead of landing inside the bar's.
            tqdm.write(trainer.nullspace_start_summary(), file=sys.stdout)
        if args.nullspace_log_per_layer:
            bases = trainer.nullspace.subspace.bases
            trainer.log({f"nullspace/rank/{key}": float(basis.shape[1]) for key, basis in bases.items()})

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.nullspace.after_step()

    def on_step_end(self, args, state, control, **kwargs):
        refresh = args.nullspace_refresh_steps
        if refresh is not None and state.global_step % refresh == 0:
            self.trainer.refresh_subspace()


class NullSpaceTrainerMixin:
    """Keeps every update of a TRL trainer out of a cached capability subspace.

    Extra constructor arguments: `reference_dataset` (a `datasets.Dataset` of general-capability
    data), which takes precedence over `args.nullspace_reference_dataset`. It is the data whose
    behaviour is preserved, not the reference *model* some trainers (DPO) also take.
    `monitor_dataset` (held-out general data; over `args.nullspace_monitor_dataset`) turns on the
    live drift metrics of `trl_nullspace.training.monitor`. `exempt_dataset` (prompts with a boolean `harmful`
    column; over `args.nullspace_exempt_dataset`) frees each exempted layer input's harm key
    (`trl_nullspace.estimation.exemption`). `contrast_dataset` (over `args.nullspace_contrast_dataset`)
    is what `nullspace_contrastive` contrasts the reference data with, instead of the training data.

    `trainer.nullspace` is the `CapabilityConstraint`; `nullspace_subspace`, `nullspace_projector` and
    `nullspace_backend` are its parts, read-only.
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
        train_dataset = bound.arguments.get("train_dataset")
        super().__init__(*bound.args, **bound.kwargs)
        # Where the projections run (one process/DDP, DeepSpeed ZeRO, FSDP2): detected once, checked now.
        backend = backend_for(self.args, self.accelerator, self.model, type(self).__name__)
        guards.check_optimizer_name(self.args)
        guards.check_quantized(self.model, self.args)
        guards.check_adapters(self.model)
        source = SubspaceSource(
            self.model,
            self.args,
            self.accelerator,
            self.processing_class,
            reference_dataset,
            contrast_dataset,
            exempt_dataset,
            train_dataset,
        )
        self.nullspace = CapabilityConstraint(self.model, self.args, source, backend)
        self.add_callback(_ConstraintCallback(self))
        self._add_drift_monitor(monitor_dataset)
        self._tag_names = [*getattr(self, "_tag_names", []), "trl-nullspace"]
        logger.info("trl-nullspace: %s", self.nullspace.subspace.summary())

    def _add_drift_monitor(self, monitor_dataset: datasets.Dataset | None) -> None:
        """Log drift on held-out general data while training (`trl_nullspace.training.monitor`), if asked."""
        if monitor_dataset is None and self.args.nullspace_monitor_dataset is not None:
            monitor_dataset = load_dataset_from(self.args.nullspace_monitor_dataset, self.args.nullspace_monitor_split)
        if monitor_dataset is None:
            return
        batches = self.nullspace.source.tokenize(monitor_dataset, self.args.nullspace_monitor_num_samples)
        steps = self.args.nullspace_monitor_steps or int(self.args.eval_steps or self.args.logging_steps)
        self.add_callback(CapabilityDriftMonitor(self, batches, steps))

    # -- the constraint's parts and reports, for users and tests --------------------------------

    # Read-only views of the constraint's parts, as the trainer's attributes since the first release.
    nullspace_subspace = property(lambda self: self.nullspace.subspace, doc="The `CapabilitySubspace` in use.")
    nullspace_projector = property(lambda self: self.nullspace.projector, doc="The bound `SubspaceProjector`.")
    nullspace_backend = property(lambda self: self.nullspace.backend, doc="The `ConstraintBackend` running it.")

    def nullspace_settings(self) -> dict[str, Any]:
        """The constraint this run trains under: saved next to the model and in its card."""
        return constraint_settings(self.nullspace)

    def nullspace_start_summary(self) -> str:
        """The paragraph printed when training starts (`trl_nullspace.training.report`)."""
        return start_summary(self.nullspace, self.args.learning_rate)

    def estimate_subspace(self) -> CapabilitySubspace:
        """A new estimate of the subspace from the reference data with the current weights (not bound)."""
        return self.nullspace.source.estimate()

    def refresh_subspace(self) -> None:
        """Re-estimate from the current weights and re-anchor (`nullspace_refresh_steps`)."""
        self.nullspace.refresh(self.model)

    # -- Trainer hooks ------------------------------------------------------------------------------

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:  # the last micro-batch of an optimizer step
            self.nullspace.before_step(
                self.model, self.state.global_step, self._step_will_be_logged(), self.optimizer, self.lr_scheduler
            )
        return loss

    def _step_will_be_logged(self) -> bool:
        """Whether the optimizer step now being taken ends with a log (the Trainer's own rule)."""
        step = self.state.global_step + 1
        if self.args.logging_strategy != "steps":
            return True
        return step % self.state.logging_steps == 0 or (step == 1 and self.args.logging_first_step)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self.nullspace.metrics.drain())
        super().log(logs, start_time)

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
                section = constraint_section(self.nullspace_settings(), self.nullspace.source.reference_description())
                handle.write("\n" + section)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Save the subspace in use and its anchors next to the weights, so resuming is exact."""
        super()._save_checkpoint(model, trial)
        output_dir = self._get_output_dir(trial)
        folder = os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self.nullspace.save_checkpoint(folder, output_dir, self.is_world_process_zero())

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
                self.nullspace.restore_checkpoint(self.model, path)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """The Trainer's load, then the weights it skips (fused experts saved per expert:
        `checkpoint_weights`), so a resumed run continues from the weights it stopped at."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = self.model if model is None else model
        if hasattr(model, "peft_config"):
            return
        reloaded = self.nullspace.backend.reload_converted_weights(model, resume_from_checkpoint)
        if reloaded:
            logger.info(
                "trl-nullspace: restored %d weights saved in another layout (e.g. %s)", len(reloaded), reloaded[0]
            )
