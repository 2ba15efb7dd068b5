"""Run by `test_multiprocess.py::test_fsdp2_row_shards_keep_reference_outputs` under torchrun.

2 CPU processes, FSDP2 (`fully_shard`) over gloo: the tiny model is constrained as the trainer
does (anchors taken, unconstrained parameters frozen), sharded by rows, trained with AdamW and
weight decay, and `RowShardProjector` restores `W U = A` on each rank's rows after every step.
Prints one line from rank 0: the reference logits' drift and how far the weights moved.
`--no-projection` skips the projection: the control that shows the drift is real. With
`--gradient` each rank also projects its rows of the reduced gradient before the step (the
`gradient`/`both` targets) and the line adds the largest `G U` on the local rows before and after.
With `--offload` the bases and anchors stay in host memory in blocks of 1 KiB (a few columns each),
as `nullspace_offload` keeps them, the bases in one copy both processes read; the line says into
how many blocks the largest basis was cut, and whether the copy was shared.
With `--smaller` the reference set is large enough that some inputs keep over half their
directions, and those bases are kept as complements (`nullspace_basis_storage="smaller"`); the
line says how many, and the largest `(M − M₀) U` of any constrained weight.
With `--step-snapshot` no anchors are recorded, and each rank copies its rows just before every step and
projects that step's change (`nullspace_step_snapshot`); `anchor_rows_kept=0` then says nothing is held between
steps.
With `--bf16-complements` the complements are stored in bf16 (`nullspace_complement_dtype`), and `invariant`
is measured against exactly what the stored complements leave out.
With `--corrupt-rank1` too, one bit of one basis differs on rank 1: splitting must be refused on every rank
(`RESULT refused=1,1`: one flag per rank, gathered on rank 0).
With `--gather-blocks` too, split bases larger than 1 KiB are gathered a few columns at a time by each weight
that reads them (`gathered_by_block` counts them).
With `--shard-bases` the bases are split over the ranks by rows too (`nullspace_shard_bases`); the line
says what share of the bases' bytes rank 0 keeps between projections, and whether each basis gathered
on every rank is the unsharded one bit for bit. `weights=` is the trained weights' fingerprint, so
two runs can be compared exactly.
The line also says whether the sharded model's weights fingerprint (what a checkpoint records) is
the unsharded model's, whether any parameter's rows split unevenly between the ranks, what share of
the anchor rows rank 0 keeps, and whether the anchors gathered for a checkpoint are the whole ones.
"""

import sys

import datasets
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from tests.conftest import logits_on
from trl_nullspace.backends.fsdp2 import RowShardProjector
from trl_nullspace.backends.node_memory import share_on_node
from trl_nullspace.data.toy import as_text, build_char_tokenizer, build_tiny_qwen2, general_examples
from trl_nullspace.estimation.activation import estimate_activation_subspace
from trl_nullspace.estimation.rank import RankSelection
from trl_nullspace.estimation.reference import tokenize_reference
from trl_nullspace.projection.basis import orthonormal_complement
from trl_nullspace.projection.projector import SubspaceProjector
from trl_nullspace.projection.targets import find_target_linears
from trl_nullspace.storage.fingerprint import weights_fingerprint


def stored_matrix(item) -> torch.Tensor:
    """The basis or complement `item` reads, whole, in its stored dtype, however it is kept (split bases are
    gathered: a collective)."""
    with item.shared.gathered():
        blocks = list(item.shared.blocks(item.device, item.shared.stored_dtype))
    return torch.cat(blocks, dim=1)


def main() -> None:
    project = "--no-projection" not in sys.argv
    project_gradient = "--gradient" in sys.argv
    offload_block_bytes = 1024 if "--offload" in sys.argv else None
    smaller = "--smaller" in sys.argv
    shard_bases = "--shard-bases" in sys.argv
    step_snapshot = "--step-snapshot" in sys.argv
    gather_block_bytes = 1024 if "--gather-blocks" in sys.argv else None
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(tokenizer)
    texts = {"text": ["12+7=19", "3*4=12", "9-5=4"]}
    selection = RankSelection(eigenvalue_threshold=1e-10)
    if smaller:  # enough reference tokens that some inputs keep over half their directions
        texts, selection = as_text(general_examples(40, seed=1)), RankSelection(energy=0.999)
    reference = tokenize_reference(datasets.Dataset.from_dict(texts), tokenizer, batch_size=8, max_length=64)
    linears = find_target_linears(model, None)
    subspace = estimate_activation_subspace(model, reference, linears, selection, False)
    if "--corrupt-rank1" in sys.argv and dist.get_rank() == 1:  # one bit of one basis differs on one rank
        key = sorted(subspace.bases)[0]
        subspace.bases[key] = subspace.bases[key].clone()
        subspace.bases[key][0, 0] = torch.nextafter(subspace.bases[key][0, 0], torch.tensor(2.0))
    projector = SubspaceProjector.bind(
        model,
        subspace,
        offload_block_bytes=offload_block_bytes,
        smaller_storage=smaller,
        share_host=share_on_node,
        complement_dtype=torch.bfloat16 if "--bf16-complements" in sys.argv else torch.float32,
    )
    complements = sum(item.shared.complement for item in projector.constrained)
    node_shared = int(all(item.shared.node_shared for item in projector.constrained))
    blocks = max(len(item.shared.columns) for item in projector.constrained)
    if step_snapshot:
        projector.use_step_snapshots()  # the trainer's `nullspace_step_snapshot`: no anchors recorded
    projector.initialise_anchors(track_updates=True)
    for name, parameter in model.named_parameters():
        if name in projector.unconstrained:
            parameter.requires_grad_(False)
    before = logits_on(model, reference)
    initial = {item.name: item.parameter.detach().clone() for item in projector.constrained}
    initial_anchors = {name: anchor.clone() for name, anchor in projector.anchors().items()}

    unsharded_fingerprint = weights_fingerprint(model)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # What a checkpoint records (every rank computes it): the unsharded model's, uneven shards too.
    fingerprint_same = int(weights_fingerprint(model) == unsharded_fingerprint)
    uneven = int(any(parameter.shape[0] % dist.get_world_size() for parameter in model.parameters()))
    stored_whole = {id(item.shared): (item.shared, stored_matrix(item)) for item in projector.constrained}
    whole_bytes = sum(shared.resident_bytes for shared, _ in stored_whole.values())
    try:
        row_shards = RowShardProjector(model, projector.constrained, shard_bases, gather_block_bytes)
    except RuntimeError as error:  # `--corrupt-rank1`: every rank must refuse, none may wait in a collective
        refused = torch.tensor([int("different bytes" in str(error))])
        flags = [torch.zeros_like(refused) for _ in range(dist.get_world_size())]
        dist.all_gather(flags, refused)  # every rank got here, or this would hang
        if dist.get_rank() == 0:
            print(f"RESULT refused={','.join(str(int(flag)) for flag in flags)}", flush=True)
        dist.destroy_process_group()
        return
    bases_kept = sum(shared.resident_bytes for shared, _ in stored_whole.values()) / whole_bytes
    gathered_exact = 1
    items = {item.name: item for item in projector.constrained}
    for item in items.values():
        gathered_exact &= int(torch.equal(stored_matrix(item), stored_whole[id(item.shared)][1]))
    gathered_by_block = sum(shared.row_sharded and len(shared.columns) > 1 for shared, _ in stored_whole.values())
    row_shards.take_previous()  # the trainer does this when training begins
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    generator = torch.Generator().manual_seed(1 + dist.get_rank())
    in_subspace = {"before": 0.0, "after": 0.0}

    def largest_gradient_coefficient() -> float:
        return max(
            (shard.local_matrix(shard.parameter.grad) @ subspace.basis_for(shard.item.name.removesuffix(".weight")))
            .abs()
            .max()
            .item()
            for shard in row_shards.shards
        )

    for _ in range(6):
        input_ids = torch.randint(3, len(tokenizer), (4, 16), generator=generator)
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        if project_gradient:
            in_subspace["before"] = max(in_subspace["before"], largest_gradient_coefficient())
            row_shards.project_gradients()
            in_subspace["after"] = max(in_subspace["after"], largest_gradient_coefficient())
        if step_snapshot:
            row_shards.take_previous()  # the trainer's before_step: this step's change is measured from here
        optimizer.step()
        optimizer.zero_grad()
        if project:
            row_shards.enforce_anchors()

    # Each rank keeps its rows' anchors only; a checkpoint gathers them whole again.
    # (With complements, the weights as last projected take the anchors' place, a shard's rows too.)
    states = [s.item.anchor_state or s.item.previous_state for s in row_shards.shards]
    held = [state for state in states if state is not None]
    kept = sum(state.held().shape[0] for state in held) / sum(s.item.matrix_shape[0] for s in row_shards.shards)
    gathered = row_shards.full_anchors()
    anchors_whole = int(
        gathered.keys() == initial_anchors.keys()
        and all(torch.allclose(gathered[name], initial_anchors[name]) for name in gathered)
    )
    drift = (logits_on(model, reference) - before).abs().max().item()
    parameters = dict(model.named_parameters())
    moved = max((parameters[name].full_tensor() - value).abs().max().item() for name, value in initial.items())

    def protected(item) -> torch.Tensor:
        """What the change must stay out of: the basis, or exactly what the stored complement leaves out (with
        bf16 complements, the rounded span's complement). Gathering a split complement is a collective."""
        if not item.shared.complement:
            return subspace.basis_for(item.name.removesuffix(".weight"))
        return orthonormal_complement(stored_matrix(item).double())

    # The guarantee itself: every constrained weight's change is orthogonal to what it protects.
    invariant = max(
        ((parameters[name].full_tensor() - value) @ protected(items[name])).abs().max().item()
        for name, value in initial.items()
    )
    trained_fingerprint = weights_fingerprint(model)  # a collective: every rank computes it
    if dist.get_rank() == 0:
        print(
            f"RESULT drift={drift:.3e} moved={moved:.3e} invariant={invariant:.3e} complements={complements} "
            f"gradient_before={in_subspace['before']:.3e} gradient_after={in_subspace['after']:.3e} "
            f"fingerprint_same={fingerprint_same} uneven_shards={uneven} blocks={blocks} "
            f"anchor_rows_kept={kept:.3f} anchors_whole={anchors_whole} node_shared={node_shared} "
            f"bases_kept={bases_kept:.3f} gathered_exact={gathered_exact} gathered_by_block={gathered_by_block} "
            f"weights={trained_fingerprint}",
            flush=True,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
