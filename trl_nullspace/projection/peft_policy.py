"""Which PEFT adapter configurations the constraint is known to hold for: the rest are refused by name.

PEFT adds adapter types and LoRA variants every release, and each computes something else: a new
variant that rescales outputs, changes the base weights at wrap time or pools the layer input would
train without error and silently move reference outputs. So the rule is an allowlist: plain LoRA
(`A` kept in the null space makes `B A K = 0` exact), with the settings that only shape it (rank,
scaling, dropout, which modules). Any other PEFT type, and any other LoRA setting changed from
PEFT's default, is refused before the subspace is estimated, naming the setting and what to use
instead. Settings with their own module-level check (DoRA, `modules_to_save`, `target_parameters`,
embedding adapters, a `B` not zero at the start) keep those messages (`guards.check_adapters`).

Cost: reading the configs, once at set-up.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

_FIX = "use plain LoRA (LoraConfig with its defaults for this setting) or full fine-tuning"

# Settings of `LoraConfig` that shape plain LoRA without changing what it computes from A and B.
_NEUTRAL = frozenset(
    {
        "task_type",
        "peft_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "r",
        "target_modules",
        "exclude_modules",
        "lora_alpha",
        "lora_dropout",
        "fan_in_fan_out",
        "use_rslora",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "runtime_config",
        "megatron_core",
        "qalora_group_size",  # read only with use_qalora, which is refused
        "ensure_weight_tying",
        # Refused with their own message by `guards.check_adapters`, on the wrapped modules:
        "use_dora",
        "modules_to_save",
        "target_parameters",
    }
)

# Settings that are dropped, not lost: what they make trainable the trainer freezes, with a warning.
_FROZEN_INSTEAD = {
    "bias": "the bias vectors it makes trainable add to every output, reference ones included, so the trainer "
    "freezes them; set bias='none'",
    "trainable_token_indices": "the token-embedding deltas it makes trainable are not constrained, so the trainer "
    "freezes them; remove trainable_token_indices",
}

_WHY = {
    "init_lora_weights": "only init_lora_weights=True or 'gaussian' start with B = 0 and the base weights "
    "untouched; the others (False, PiSSA, OLoRA, LoftQ, CorDA, LoRA-GA, orthogonal, MiCA) start with B ≠ 0 or "
    "rewrite the base weights, and EVA initialises A along the top activation directions, exactly the ones the "
    "constraint removes from A",
    "kasa_config": "KaSA truncates the base weights' singular values when PEFT wraps the model, so outputs change "
    "before the first step",
    "eva_config": "EVA initialises A along the top activation directions, exactly the ones the constraint removes "
    "from A",
    "corda_config": "CorDA rewrites the base weights and starts with B ≠ 0",
    "loftq_config": "LoftQ rewrites the base weights and starts with B ≠ 0",
    "lora_ga_config": "LoRA-GA rewrites the base weights and starts with B ≠ 0",
    "use_qalora": "QA-LoRA pools the layer input in groups before A, so A's null space is not the input's",
    "lora_bias": "a trainable bias on B adds to every output, reference ones included",
    "layer_replication": "replicated layers reuse weights at new depths, whose inputs the subspace never saw",
}


def check_peft_configs(model: nn.Module) -> None:
    """Refuse PEFT types other than LoRA and LoRA settings outside the allowlist; warn for settings
    whose trainable parameters the trainer freezes instead (`_FROZEN_INSTEAD`)."""
    for adapter, config in (getattr(model, "peft_config", None) or {}).items():
        peft_type = str(getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", "?")))
        if peft_type != "LORA":
            raise ValueError(_other_type_message(adapter, type(config).__name__, peft_type, config))
        for name, value, default in _changed_settings(config):
            if name in _NEUTRAL:
                continue
            if name == "init_lora_weights" and value in (True, "gaussian"):
                continue
            if name in _FROZEN_INSTEAD:
                logger.warning(
                    "trl-nullspace: LoraConfig(%s=%r) of adapter %r: %s.", name, value, adapter, _FROZEN_INSTEAD[name]
                )
                continue
            why = _WHY.get(name, "the null-space trainers do not know that this LoRA variant keeps reference outputs")
            raise ValueError(
                f"LoraConfig({name}={value!r}) of adapter {adapter!r} is not supported: {why}. Unset it "
                f"({name}={default!r}), or {_FIX}."
            )


def _changed_settings(config: Any) -> list[tuple[str, Any, Any]]:
    """(name, value, default) of every field of `config` that differs from its class's default."""
    defaults = type(config)()
    return [
        (field.name, getattr(config, field.name), getattr(defaults, field.name))
        for field in dataclasses.fields(config)
        if getattr(config, field.name) != getattr(defaults, field.name)
    ]


def _other_type_message(adapter: str, config_name: str, peft_type: str, config: Any) -> str:
    if getattr(config, "is_prompt_learning", False):
        why = (
            "prompt learning adds trained virtual tokens to every input, reference ones included, and the "
            "constraint acts on weight matrices"
        )
    else:
        why = f"a {peft_type} update is not a LoRA B·A product, so A cannot be kept in the null space"
    return (
        f"PEFT {peft_type} adapters ({config_name}, adapter {adapter!r}) are not supported by the null-space "
        f"trainers: {why}. Use LoraConfig (plain LoRA, A constrained) or full fine-tuning (every targeted "
        "weight constrained)."
    )
