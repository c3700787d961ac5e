"""Optimizers: the Newton-Schulz core, Muon, and the hybrid Muon+AdamW builder."""

from specopt.optim.hybrid import HybridOptimizer, RoutingReport, build_optimizer, describe_routing
from specopt.optim.muon import Muon
from specopt.optim.newton_schulz import (
    SCHEDULES,
    NSSchedule,
    orthogonality_error,
    orthogonalize,
    orthogonalize_many,
    polar_factor,
)
from specopt.optim.nonfinite import NonFiniteGradientError

__all__ = [
    "SCHEDULES",
    "HybridOptimizer",
    "Muon",
    "NSSchedule",
    "NonFiniteGradientError",
    "RoutingReport",
    "build_optimizer",
    "describe_routing",
    "orthogonality_error",
    "orthogonalize",
    "orthogonalize_many",
    "polar_factor",
]
