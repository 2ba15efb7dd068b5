"""The storage options left unset become the lean storage under FSDP2 and ZeRO-3, the anchored whole bases
elsewhere, and an option the user set is never changed (`backends.storage_choice`)."""

import pytest
from torch import nn

from tests.conftest import accelerator_launched_with
from trl_nullspace.backends.selection import backend_for
from trl_nullspace.config import NullSpaceArguments

LEAN = ("smaller", "bfloat16", True, True)
ANCHORED = ("basis", "float32", False, False)


@pytest.mark.parametrize(
    "backend, zero_stage, settings, expected",
    [
        ("local", 2, {}, ANCHORED),
        ("deepspeed", 2, {}, ANCHORED),
        ("fsdp2", 2, {}, LEAN),
        ("deepspeed", 3, {}, LEAN),
        ("deepspeed", 3, {"nullspace_deepspeed_projection": "around_step"}, ANCHORED),
        ("deepspeed", 3, {"nullspace_method": "gradient"}, ANCHORED),
        ("fsdp2", 2, {"nullspace_offload": True}, ANCHORED),
        ("fsdp2", 2, {"nullspace_projection_target": "gradient"}, ("smaller", "bfloat16", True, False)),
        ("fsdp2", 2, {"nullspace_shard_bases": False}, ("smaller", "bfloat16", False, True)),
        ("fsdp2", 2, {"nullspace_complement_dtype": "float32"}, ("smaller", "float32", True, True)),
        (
            "deepspeed",
            3,
            {"nullspace_basis_storage": "basis", "nullspace_step_snapshot": False},
            ("basis", "float32", True, False),
        ),
        ("local", 2, {"nullspace_complement_dtype": "bfloat16"}, ("smaller", "bfloat16", False, False)),
        ("local", 2, {"nullspace_basis_storage": "smaller"}, ("smaller", "float32", False, False)),
        ("local", 2, {"nullspace_step_snapshot": True}, ("basis", "float32", False, True)),
    ],
)
def test_unset_storage_options_choose_the_lean_storage_where_it_is_built(backend, zero_stage, settings, expected):
    args = NullSpaceArguments(**settings)
    accelerator = accelerator_launched_with(backend, zero_stage)
    chosen = backend_for(args, accelerator, nn.Sequential(nn.Linear(4, 4)), "T")
    assert chosen.name == {"local": "one process or DDP", "fsdp2": "FSDP", "deepspeed": "DeepSpeed"}[backend]
    resolved = _storage(args)
    assert resolved == expected
    # The start summary names what was chosen for the user, and only that.
    said = chosen.chosen_storage_summary()
    assert ("in bf16" in said) == (expected[1] == "bfloat16" and "nullspace_complement_dtype" not in settings)
    assert ("bases split over the ranks" in said) == (expected[2] and "nullspace_shard_bases" not in settings)
    assert ("no anchors" in said) == (expected[3] and "nullspace_step_snapshot" not in settings)
    # Chosen once: a second pass over the filled options changes nothing.
    backend_for(args, accelerator, nn.Sequential(nn.Linear(4, 4)), "T")
    assert _storage(args) == resolved


def test_the_storage_options_are_unset_by_default():
    assert _storage(NullSpaceArguments()) == ("auto", "auto", None, None)


def _storage(args: NullSpaceArguments) -> tuple:
    return (
        args.nullspace_basis_storage,
        args.nullspace_complement_dtype,
        args.nullspace_shard_bases,
        args.nullspace_step_snapshot,
    )
