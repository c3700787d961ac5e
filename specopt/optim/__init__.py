from specopt.optim.hybrid import HybridOptimizer, RoutingReport, build_optimizer, describe_routing

__all__ = ["HybridOptimizer", "RoutingReport", "build_optimizer", "describe_routing"]
