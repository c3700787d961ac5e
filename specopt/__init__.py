"""specopt: Muon/AdamW optimizers, polynomial weight preconditioning (PC layer) and
spectral monitoring for PyTorch.

Public API (re-exported here):
"""

from specopt.models import Llama, LlamaConfig

# -- optimizers (specopt.optim) --
from specopt.optim.hybrid import HybridOptimizer, RoutingReport, build_optimizer, describe_routing

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

__version__ = "0.1.0"

__all__ = [
    "PC_LEVELS",
    "HybridOptimizer",
    "Llama",
    "LlamaConfig",
    "OddPolynomial",
    "PCHandle",
    "PCParametrization",
    "RoutingReport",
    "__version__",
    "apply_pc",
    "build_optimizer",
    "describe_routing",
    "design_odd_polynomial",
    "get_pc",
    "is_pc_module",
    "merge_pc",
    "pc_weight",
]
