"""The storage options left unset become the lean storage under FSDP2 and ZeRO-3, the anchored whole bases
elsewhere, and an option the user set is never changed (`backends.storage_choice`)."""

import pytest
from torch import nn

from tests.conftest import accelerator_launched_with
from trl_nullspace.backends.selection import backend_for
from trl_nullspace.config import NullSpaceArguments

LEAN = ("smaller", True, True)
ANCHORED = ("basis", False, False)


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
        ("fsdp2", 2, {"nullspace_projection_target": "gradient"}, ("smaller", True, False)),
        ("fsdp2", 2, {"nullspace_shard_bases": False}, ("smaller", False, True)),
        (
            "deepspeed",
            3,
            {"nullspace_basis_storage": "basis", "nullspace_step_snapshot": False},
            ("basis", True, False),
        ),
        ("local", 2, {"nullspace_complement_dtype": "bfloat16"}, ("smaller", False, False)),
        ("local", 2, {"nullspace_step_snapshot": True}, ("basis", False, True)),
    ],
)
def test_unset_storage_options_choose_the_lean_storage_where_it_is_built(backend, zero_stage, settings, expected):
    args = NullSpaceArguments(**settings)
    accelerator = accelerator_launched_with(backend, zero_stage)
    chosen = backend_for(args, accelerator, nn.Sequential(nn.Linear(4, 4)), "T")
    assert chosen.name == {"local": "one process or DDP", "fsdp2": "FSDP", "deepspeed": "DeepSpeed"}[backend]
    resolved = (args.nullspace_basis_storage, args.nullspace_shard_bases, args.nullspace_step_snapshot)
    assert resolved == expected
    # The start summary names what was chosen for the user, and only that.
    said = chosen.chosen_storage_summary()
    assert ("bases split over the ranks" in said) == (expected[1] and "nullspace_shard_bases" not in settings)
    assert ("no anchors" in said) == (expected[2] and "nullspace_step_snapshot" not in settings)
    # Chosen once: a second pass over the filled options changes nothing.
    backend_for(args, accelerator, nn.Sequential(nn.Linear(4, 4)), "T")
    assert (args.nullspace_basis_storage, args.nullspace_shard_bases, args.nullspace_step_snapshot) == resolved


def test_the_storage_options_are_unset_by_default():
    args = NullSpaceArguments()
    assert (args.nullspace_basis_storage, args.nullspace_shard_bases, args.nullspace_step_snapshot) == (
        "auto",
        None,
        None,
    )
