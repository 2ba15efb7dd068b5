"""Keeping updates out of the subspace: which modules are constrained (`targets`, fused `experts`,
the PEFT adapters known to be safe: `peft_policy`), how each basis is stored (`basis`) and the
projector that binds bases to parameters and projects gradients and updates (`projector`)."""
