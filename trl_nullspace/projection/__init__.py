"""Keeping updates out of the subspace: which modules are targets (`targets`, fused `experts`, the
PEFT adapters known to be safe: `peft_policy`), the registered kinds of constrained parameter
(`kinds/`), how each basis is stored (`basis`), one constrained parameter's projections
(`constrained`) and the projector that binds a subspace to a model and runs them all (`projector`)."""
