"""Where the projections run: one process or DDP (`local`), DeepSpeed ZeRO (`zero/`), FSDP2 (`fsdp2`).

Every backend is a `ConstraintBackend` (`base`), chosen once by `selection.backend_for`; the trainer
calls the same moments on each. `sharded` holds what ZeRO and FSDP2 share, `node_memory` the one
host copy per node of offloaded bases. docs/backends.md says what each costs and exchanges.
"""
