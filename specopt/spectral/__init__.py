"""Spectral estimators, metrics and the training-time monitor."""

from specopt.spectral.power_iteration import (
    DEFAULT_EPS,
    init_singular_vectors,
    power_iteration_,
    sigma_max_estimate,
    vectors_are_valid,
)

__all__ = [
    "DEFAULT_EPS",
    "init_singular_vectors",
    "power_iteration_",
    "sigma_max_estimate",
    "vectors_are_valid",
]
