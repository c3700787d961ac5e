"""specopt: Muon/AdamW optimizers, polynomial weight preconditioning (PC layer) and
spectral monitoring for PyTorch.

Public API (re-exported here):
"""

from specopt.hooks import AttachHandle
from specopt.models import Llama, LlamaConfig

# -- optimizers (specopt.optim) --
from specopt.optim.hybrid import HybridOptimizer, RoutingReport, build_optimizer, describe_routing
from specopt.optim.muon import Muon
from specopt.optim.newton_schulz import orthogonalize, polar_factor
from specopt.optim.nonfinite import NonFiniteGradientError

# -- PC layer (specopt.pc) --
from specopt.pc import (
    PC_LEVELS,
    OddPolynomial,
    PCHandle,
    PCParametrization,
    apply_pc,
    design_odd_polynomial,
    get_pc,
    is_pc_module,
    merge_pc,
    pc_weight,
)

# -- spectral monitoring (specopt.spectral) --
from specopt.spectral import (
    METRIC_NAMES,
    Alarm,
    AlarmRule,
    ConditionNumberAlarm,
    LossSpikeAlarm,
    NonFiniteAlarm,
    SigmaMaxGrowthAlarm,
    SpectralMonitor,
    StableRankCollapseAlarm,
    default_alarms,
    model_aggregates,
    singular_values,
    spectrum_metrics,
)

__version__ = "0.1.0"

__all__ = [
    "METRIC_NAMES",
    "PC_LEVELS",
    "Alarm",
    "AlarmRule",
    "AttachHandle",
    "ConditionNumberAlarm",
    "HybridOptimizer",
    "Llama",
    "LlamaConfig",
    "LossSpikeAlarm",
    "Muon",
    "NonFiniteAlarm",
    "NonFiniteGradientError",
    "OddPolynomial",
    "PCHandle",
    "PCParametrization",
    "RoutingReport",
    "SigmaMaxGrowthAlarm",
    "SpectralMonitor",
    "StableRankCollapseAlarm",
    "__version__",
    "apply_pc",
    "build_optimizer",
    "default_alarms",
    "describe_routing",
    "design_odd_polynomial",
    "get_pc",
    "is_pc_module",
    "merge_pc",
    "model_aggregates",
    "orthogonalize",
    "pc_weight",
    "polar_factor",
    "singular_values",
    "spectrum_metrics",
]
