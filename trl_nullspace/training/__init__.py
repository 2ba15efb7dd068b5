"""How a TRL trainer gains the constraint: the thin mixin (`mixin`) holds one `CapabilityConstraint`
(`constraint`), composed of where its subspace comes from (`source`), the projector, the backend and
what each step measured (`step_metrics`); what a run reports (`report`), the refusals (`guards`,
`approximations`), the learning-rate scale, the drift monitor, the model card's section and the
console output (`progress`, `library_notices`)."""
