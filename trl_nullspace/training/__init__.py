"""How a TRL trainer gains the constraint: the mixin (`mixin`) and where its subspace comes from
(`subspace_setup`), the refusals (`guards`, `approximations`), the learning-rate scale, the drift
monitor, the model card's section and the console output (`progress`, `library_notices`)."""
