"""Every rule that refuses a configuration under which the constraint would silently not hold.

The product's promise is that the constraint holds or the trainer refuses loudly. Each function
here checks one family of configurations and raises with the cause and the fix; the trainer calls
them at set-up (`check_*` on the model and config) and when training starts
(`check_optimizer_steps_what_is_constrained`, once the optimizer exists). What a backend cannot
honour is refused by the backend itself (`ConstraintBackend.check_supported` in
`trl_nullspace.backends`). docs/troubleshooting.md lists every message.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from trl_nullspace.config import NullSpaceArguments
from trl_nullspace.projection.kinds.registry import check_kinds, owned_by_a_kind
from trl_nullspace.projection.peft_policy import check_peft_configs

_RESTORING_OPTIMIZERS = ("schedulefree", "anyprecision")
_IN_BACKWARD_OPTIMIZERS = ("lomo",)


def check_optimizer_name(args: NullSpaceArguments) -> None:
    """Refuse `optim` choices that would undo or bypass the projection.

    Schedule-free optimizers keep the real iterates in their state and rebuild the weights from
    them, and AnyPrecision AdamW keeps Kahan compensation buffers: both put back what the
    `update` projection removed. LOMO/AdaLomo and the layer-wise GaLore/APOLLO variants step
    inside backward, so no synchronised gradient is ever seen for the `gradient` target.
    """
    optim = str(getattr(args.optim, "value", args.optim))
    target = args.nullspace_projection_target
    if target in ("update", "both") and (optim.startswith("schedule_free") or optim == "adamw_anyprecision"):
        raise ValueError(
            f"optim={optim!r} keeps its own copy of the weights' trajectory in its state, which would restore "
            f"what nullspace_projection_target={target!r} removes after each step. Use adamw_torch (or another "
            "optimizer that updates the weights in place)."
        )
    if optim in ("lomo", "adalomo"):
        raise ValueError(
            f"optim={optim!r} updates the weights during backward, without an optimizer step the projection "
            "can follow. Use adamw_torch (or another optimizer with a step)."
        )
    if target in ("gradient", "both") and optim.endswith("_layerwise"):
        raise ValueError(
            f"optim={optim!r} steps each layer inside backward, before nullspace_projection_target={target!r} "
            "could project its gradient. Use nullspace_projection_target='update' or a non-layer-wise optimizer."
        )


def check_quantized(model: nn.Module, args: NullSpaceArguments) -> None:
    """Quantized weights cannot be updated or projected; only adapters on top of them can (QLoRA)."""
    quantized = getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False)
    if not quantized:
        return
    base_trainable = [
        name for name, parameter in model.named_parameters() if parameter.requires_grad and not owned_by_a_kind(name)
    ]
    if base_trainable or args.nullspace_method != "activation":
        raise ValueError(
            "The model's base weights are quantized: they cannot be projected or trained directly. Train LoRA "
            "adapters on them (pass peft_config, QLoRA-style) with nullspace_method='activation'; trainable "
            f"non-adapter parameters found: {base_trainable[:3]}."
        )


def check_adapters(model: nn.Module) -> None:
    """Refuse PEFT adapters whose outputs on the reference data the constraint cannot hold.

    - What each kind of constrained parameter refuses for itself (`ParameterKind.check`; LoRA:
      DoRA, whose row norm moves as `B` trains (measured: 0.3–0.5 with a strict threshold, against
      2e-4 for plain LoRA), and adapters whose `B` is not zero at set-up).
    - LoRA on embedding layers, LoRA on parameters (`target_parameters`, e.g. fused MoE experts),
      and `modules_to_save` copies would be trainable parameters the constraint does not reach.
    - Every other PEFT type and LoRA variant: `peft_policy.check_peft_configs`, from the configs.
    """
    check_peft_configs(model)
    check_kinds(model)  # each kind's own refusals (LoRA: DoRA, B not zero at the start)
    embeddings, saved_copies, wrapped_parameters = [], [], []
    for name, module in model.named_modules():
        if type(module).__name__ == "ParamWrapper" and _any_trainable(getattr(module, "lora_A", {}).values()):
            wrapped_parameters.append(f"{name}.{getattr(module, 'parameter_name', '?')}")
        if len(getattr(module, "lora_embedding_A", {})) and _any_trainable(module.lora_embedding_A.values()):
            embeddings.append(name)
        if type(module).__name__ == "ModulesToSaveWrapper" and _any_trainable([module]):
            saved_copies.append(name)
    if wrapped_parameters:
        raise ValueError(
            f"LoRA on parameters (target_parameters, e.g. {wrapped_parameters[0]}) is not constrained by the "
            "null-space trainers and would train unconstrained or not at all. Remove target_parameters; if you did "
            "not set it, PEFT's target_modules='all-linear' added it for the fused experts: name the modules "
            "instead (e.g. target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj']). Without adapters the fused "
            "mixture-of-experts weights are constrained expert by expert."
        )
    if embeddings:
        raise ValueError(
            f"LoRA on embedding layers ({embeddings[:2]}) is not constrained by the null-space trainers and would "
            "train unconstrained; remove them from target_modules (e.g. embed_tokens)."
        )
    if saved_copies:
        raise ValueError(
            f"modules_to_save copies ({saved_copies[:2]}) would train without the constraint; remove "
            "modules_to_save from the LoraConfig (the null-space trainers keep lm_head and embeddings frozen)."
        )


def _any_trainable(items: Iterable[nn.Module | torch.Tensor]) -> bool:
    """Whether any of these modules or parameters (PEFT keeps embedding adapters as bare ones) trains."""
    return any(
        parameter.requires_grad
        for item in items
        for parameter in (item.parameters() if isinstance(item, nn.Module) else [item])
    )


def check_optimizer_steps_what_is_constrained(
    optimizer: torch.optim.Optimizer,
    constrained: dict[str, torch.Tensor],
    may_train_unconstrained: set[str],
    named_parameters: dict[str, torch.Tensor],
) -> None:
    """When training starts: the optimizer must step exactly the parameters the trainer projects.

    An optimizer passed as `optimizers=(...)` may be built on other parameter objects, or be one of
    the kinds the `optim` check refuses; a backend may swap modules after set-up (e.g. Accelerate's
    TransformerEngine FP8 path). Then the projection would touch tensors nobody trains, or miss
    the ones that are trained. `may_train_unconstrained` are names allowed to train without a
    projection (LoRA `B` next to a constrained `A`, and everything when the user asked for it).
    """
    kind = type(optimizer).__name__.lower()
    for inner in (kind, type(getattr(optimizer, "optimizer", optimizer)).__name__.lower()):
        if any(marker in inner for marker in _RESTORING_OPTIMIZERS + _IN_BACKWARD_OPTIMIZERS):
            raise ValueError(
                f"The optimizer {type(optimizer).__name__} restores or bypasses the weights' projected values "
                "(schedule-free, AnyPrecision, LOMO): pass an optimizer that updates the weights in place, such "
                "as torch.optim.AdamW."
            )
    stepped = {id(parameter) for group in optimizer.param_groups for parameter in group["params"]}
    missed = [name for name, parameter in constrained.items() if id(parameter) not in stepped]
    if missed:
        raise RuntimeError(
            f"The optimizer does not step the constrained parameters {missed[:3]} ({len(missed)} in all): they were "
            "replaced after the trainer bound the subspace (a custom optimizer built on other parameters, or a "
            "backend that swaps modules, such as TransformerEngine FP8). Build the optimizer from "
            "trainer.model.parameters() after creating the trainer, or train without the module swap."
        )
    constrained_ids = {id(parameter) for parameter in constrained.values()}
    escaping = [
        name
        for name, parameter in named_parameters.items()
        if parameter.requires_grad
        and id(parameter) in stepped
        and id(parameter) not in constrained_ids
        and name not in may_train_unconstrained
    ]
    if escaping:
        raise RuntimeError(
            f"The optimizer trains {escaping[:3]} ({len(escaping)} in all), which are neither constrained nor "
            "frozen: they were made trainable after set-up. Leave them frozen, or set "
            "nullspace_freeze_untargeted=False to train them unconstrained knowingly."
        )
