"""specopt: Muon/AdamW optimizers, polynomial weight preconditioning (PC layer) and
spectral monitoring for PyTorch.

Public API (re-exported here):
"""

from specopt.models import Llama, LlamaConfig

# -- optimizers (specopt.optim) --
from specopt.optim.hybrid import HybridOptimizer, RoutingReport, build_optimizer, describe_routing

# -- PC layer (specopt.pc) --

# -- spectral monitoring (specopt.spectral) --

__version__ = "0.1.0"

__all__ = [
    "HybridOptimizer",
    "Llama",
    "LlamaConfig",
    "RoutingReport",
    "__version__",
    "build_optimizer",
    "describe_routing",
]
