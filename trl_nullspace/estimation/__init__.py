"""Estimating the capability subspace from reference data: the entry point (`estimate`), the
activation and gradient estimators, the harm-keyed exemption, the rank rule (`rank`), reference
batches (`reference`) and the result, `CapabilitySubspace` (`subspace`)."""
