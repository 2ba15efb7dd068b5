"""Estimators of the capability subspace from a reference set."""

from trl_nullspace.estimators.activation import estimate_activation_subspace
from trl_nullspace.estimators.gradient import estimate_gradient_subspace

__all__ = ["estimate_activation_subspace", "estimate_gradient_subspace"]
